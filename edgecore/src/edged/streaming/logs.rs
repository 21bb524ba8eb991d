//! Container logs from the CRI log files, as the kubelet serves `/containerLogs`.
//!
//! containerd writes one entry per line: `<RFC3339Nano time> <stdout|stderr> <P|F> <content>`,
//! where `P` marks a piece of a longer line whose rest follows in later entries. Users get the
//! content back (a newline after each `F` entry), optionally prefixed with the entry's time, and
//! filtered the way `kubectl logs` asks: `tailLines`, `sinceSeconds`/`sinceTime`, `limitBytes`,
//! `stream`, `follow`. An entry that does not parse is passed through as it is, so nothing the
//! container wrote is hidden (the kubelet does the same).

use std::future::Future;
use std::io::SeekFrom;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tokio::io::{
    AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt, BufReader,
};

/// Which of the container's output streams to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// What `kubectl logs` asked for (the kubelet's query parameters).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    pub limit_bytes: Option<u64>,
    /// Entries older than this are skipped.
    pub since: Option<Timestamp>,
    /// `None`: both.
    pub stream: Option<OutputStream>,
}

fn flag(v: &str) -> bool {
    matches!(v, "1" | "true" | "True" | "TRUE")
}

impl LogOptions {
    /// Reads the kubelet's query parameters; `now` anchors `sinceSeconds`.
    pub fn from_query(params: &[(String, String)], now: Timestamp) -> Result<LogOptions, String> {
        let mut o = LogOptions::default();
        let number = |k: &str, v: &str| -> Result<u64, String> {
            v.parse::<i64>()
                .ok()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| format!("{k} must be a non-negative integer, not `{v}`"))
        };
        for (k, v) in params {
            match k.as_str() {
                "follow" => o.follow = flag(v),
                "previous" => o.previous = flag(v),
                "timestamps" => o.timestamps = flag(v),
                "tailLines" => o.tail_lines = Some(number(k, v)?),
                "limitBytes" => {
                    let n = number(k, v)?;
                    if n == 0 {
                        return Err("limitBytes must be greater than zero".into());
                    }
                    o.limit_bytes = Some(n);
                }
                "sinceSeconds" => {
                    let s = number(k, v)?;
                    let s = i64::try_from(s).unwrap_or(i64::MAX).min(1 << 40);
                    o.since = Some(
                        now.checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(s))
                            .unwrap_or(Timestamp::MIN),
                    );
                }
                "sinceTime" => {
                    o.since =
                        Some(Timestamp::from_str(v).map_err(|e| {
                            format!("sinceTime `{v}` is not an RFC 3339 time: {e}")
                        })?);
                }
                "stream" => {
                    o.stream = match v.as_str() {
                        "Stdout" | "stdout" => Some(OutputStream::Stdout),
                        "Stderr" | "stderr" => Some(OutputStream::Stderr),
                        "All" | "" => None,
                        _ => {
                            return Err(format!("stream must be Stdout, Stderr or All, not `{v}`"));
                        }
                    }
                }
                _ => {}
            }
        }
        if o.stream.is_some() && o.tail_lines.is_some() {
            // The API server refuses this combination too: tail counts lines of both streams.
            return Err("tailLines cannot be combined with stream".into());
        }
        Ok(o)
    }
}

/// One entry of a CRI log file.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The time as written (echoed with `timestamps=true`).
    pub time: &'a str,
    pub stream: OutputStream,
    /// A piece of a longer line (`P`): no newline follows it.
    pub partial: bool,
    pub content: &'a [u8],
}

/// Parses one line of a CRI log file (without its trailing newline).
pub fn parse_entry(line: &[u8]) -> Option<Entry<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let stream = match parts.next()? {
        b"stdout" => OutputStream::Stdout,
        b"stderr" => OutputStream::Stderr,
        _ => return None,
    };
    let partial = match parts.next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    Some(Entry {
        time,
        stream,
        partial,
        content: parts.next().unwrap_or(b""),
    })
}

/// Offset of the first of the last `n` lines of the file (0 if it has fewer).
async fn tail_offset(file: &mut tokio::fs::File, n: u64) -> std::io::Result<u64> {
    let len = file.metadata().await?.len();
    if n == 0 {
        return Ok(len);
    }
    let mut pos = len;
    let mut newlines = 0u64;
    let mut buf = vec![0u8; 8192];
    // The file's last byte is normally the newline ending the last line: it does not start one.
    let mut skip_last = true;
    while pos > 0 {
        let chunk = (pos as usize).min(buf.len());
        pos -= chunk as u64;
        file.seek(SeekFrom::Start(pos)).await?;
        file.read_exact(&mut buf[..chunk]).await?;
        for i in (0..chunk).rev() {
            if buf[i] != b'\n' {
                skip_last = false;
                continue;
            }
            if skip_last {
                skip_last = false;
                continue;
            }
            newlines += 1;
            if newlines == n {
                return Ok(pos + i as u64 + 1);
            }
        }
    }
    Ok(0)
}

/// Writes what `out` should get for one entry under `opts`; returns `false` once `limitBytes`
/// is used up.
struct Writer<'o, W> {
    out: &'o mut W,
    opts: &'o LogOptions,
    written: u64,
    /// The previous entry of each stream ended its line (the next one gets a timestamp).
    line_start: [bool; 2],
}

impl<W: AsyncWrite + Unpin> Writer<'_, W> {
    async fn entry(&mut self, line: &[u8]) -> std::io::Result<bool> {
        let (time, stream, partial, content) = match parse_entry(line) {
            Some(e) => (Some(e.time), Some(e.stream), e.partial, e.content),
            None => (None, None, false, line),
        };
        // A line of neither stream belongs to no stream asked for by name.
        if self.opts.stream.is_some() && self.opts.stream != stream {
            return Ok(true);
        }
        if let (Some(since), Some(t)) = (self.opts.since, time)
            && Timestamp::from_str(t).is_ok_and(|t| t < since)
        {
            return Ok(true);
        }
        let slot = usize::from(stream == Some(OutputStream::Stderr));
        let mut piece = Vec::with_capacity(content.len() + 40);
        if self.opts.timestamps
            && self.line_start[slot]
            && let Some(t) = time
        {
            piece.extend_from_slice(t.as_bytes());
            piece.push(b' ');
        }
        piece.extend_from_slice(content);
        if !partial {
            piece.push(b'\n');
        }
        self.line_start[slot] = !partial;
        if let Some(limit) = self.opts.limit_bytes {
            let room = limit.saturating_sub(self.written) as usize;
            if piece.len() >= room {
                self.out.write_all(&piece[..room]).await?;
                self.written += room as u64;
                return Ok(false);
            }
        }
        self.out.write_all(&piece).await?;
        self.written += piece.len() as u64;
        Ok(true)
    }
}

/// Copies the log at `path` to `out` as `opts` asks. With `follow`, waits for more until
/// `running` says the container stopped and everything it wrote was sent; `poll` is how often
/// the file is checked meanwhile.
pub async fn copy_log<W, F, Fut>(
    path: &Path,
    opts: &LogOptions,
    out: &mut W,
    mut running: F,
    poll: Duration,
) -> std::io::Result<u64>
where
    W: AsyncWrite + Unpin,
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut file = tokio::fs::File::open(path).await?;
    let start = match opts.tail_lines {
        Some(n) => tail_offset(&mut file, n).await?,
        None => 0,
    };
    file.seek(SeekFrom::Start(start)).await?;
    let mut reader = BufReader::with_capacity(32 * 1024, file);
    let mut w = Writer {
        out,
        opts,
        written: 0,
        line_start: [true, true],
    };
    let mut line = Vec::with_capacity(1024);
    // Checks of the container's state are spaced out: they are runtime calls.
    let check_every = (Duration::from_secs(1).as_millis() / poll.as_millis().max(1)).max(1);
    let mut idle_polls = 0u128;
    let mut stopped = false;
    loop {
        let n = reader.read_until(b'\n', &mut line).await?;
        if n > 0 && line.last() == Some(&b'\n') {
            line.pop();
            let more = w.entry(&line).await?;
            line.clear();
            if !more {
                break;
            }
            idle_polls = 0;
            continue;
        }
        // End of what is written so far (a line may be half-written: keep its start).
        if !opts.follow || stopped {
            if !line.is_empty() {
                w.entry(&line).await?;
            }
            break;
        }
        w.out.flush().await?;
        if idle_polls.is_multiple_of(check_every) && !running().await {
            // Stopped: what it wrote before stopping is in the file by now; read it to the end.
            stopped = true;
            continue;
        }
        idle_polls += 1;
        tokio::time::sleep(poll).await;
    }
    w.out.flush().await?;
    Ok(w.written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    const LOG: &str = "2026-12-02T10:00:00.1Z stdout F first\n\
        2026-12-02T10:00:01.000000002Z stderr F oops\n\
        2026-12-02T10:00:02Z stdout P hel\n\
        2026-12-02T10:00:02.5Z stdout F lo\n\
        not a cri line\n\
        2026-12-02T10:00:03Z stdout F last\n";

    async fn read(opts: LogOptions) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, LOG).unwrap();
        let mut out = Vec::new();
        copy_log(
            &path,
            &opts,
            &mut out,
            || async { false },
            Duration::from_millis(5),
        )
        .await
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    fn q(pairs: &[(&str, &str)]) -> LogOptions {
        let params: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        LogOptions::from_query(
            &params,
            Timestamp::from_str("2026-12-02T10:00:04Z").unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn entries_parse() {
        let e = parse_entry(b"2026-12-02T10:00:00Z stderr P a b c").unwrap();
        assert_eq!(e.time, "2026-12-02T10:00:00Z");
        assert_eq!(e.stream, OutputStream::Stderr);
        assert!(e.partial);
        assert_eq!(e.content, b"a b c");
        assert_eq!(
            parse_entry(b"2026-12-02T10:00:00Z stdout F")
                .unwrap()
                .content,
            b""
        );
        assert!(parse_entry(b"x y F z").is_none());
        assert!(parse_entry(b"x stdout Q z").is_none());
    }

    #[tokio::test]
    async fn content_is_returned_not_the_cri_format() {
        assert_eq!(
            read(q(&[])).await,
            "first\noops\nhello\nnot a cri line\nlast\n"
        );
    }

    #[tokio::test]
    async fn timestamps_prefix_each_line_once() {
        assert_eq!(
            read(q(&[("timestamps", "true")])).await,
            "2026-12-02T10:00:00.1Z first\n2026-12-02T10:00:01.000000002Z oops\n\
             2026-12-02T10:00:02Z hello\nnot a cri line\n2026-12-02T10:00:03Z last\n"
        );
    }

    #[tokio::test]
    async fn tail_since_limit_and_stream() {
        assert_eq!(
            read(q(&[("tailLines", "2")])).await,
            "not a cri line\nlast\n"
        );
        assert_eq!(read(q(&[("tailLines", "0")])).await, "");
        assert_eq!(
            read(q(&[("tailLines", "100")])).await,
            "first\noops\nhello\nnot a cri line\nlast\n"
        );
        // sinceSeconds=2 from 10:00:04 → entries at or after 10:00:02.
        assert_eq!(
            read(q(&[("sinceSeconds", "2")])).await,
            "hello\nnot a cri line\nlast\n"
        );
        assert_eq!(
            read(q(&[("sinceTime", "2026-12-02T10:00:01Z")])).await,
            "oops\nhello\nnot a cri line\nlast\n"
        );
        assert_eq!(read(q(&[("limitBytes", "8")])).await, "first\noo");
        assert_eq!(read(q(&[("stream", "Stderr")])).await, "oops\n");
    }

    #[test]
    fn bad_options_are_named() {
        let now = Timestamp::from_str("2026-12-02T10:00:04Z").unwrap();
        let bad = |k: &str, v: &str| {
            LogOptions::from_query(&[(k.to_owned(), v.to_owned())], now).unwrap_err()
        };
        assert!(bad("tailLines", "-1").contains("tailLines"));
        assert!(bad("limitBytes", "0").contains("limitBytes"));
        assert!(bad("sinceTime", "yesterday").contains("sinceTime"));
        assert!(bad("stream", "stdin").contains("stream"));
    }

    #[tokio::test]
    async fn follow_streams_new_lines_until_the_container_stops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, "2026-12-02T10:00:00Z stdout F one\n").unwrap();
        let running = Arc::new(AtomicBool::new(true));
        let (mut out, mut client) = tokio::io::duplex(4096);
        let (p, r) = (path.clone(), running.clone());
        let task = tokio::spawn(async move {
            let opts = LogOptions {
                follow: true,
                ..Default::default()
            };
            copy_log(
                &p,
                &opts,
                &mut out,
                move || {
                    let r = r.clone();
                    async move { r.load(Ordering::SeqCst) }
                },
                Duration::from_millis(5),
            )
            .await
        });
        let mut buf = vec![0u8; 64];
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"one\n");
        // A line written in two pieces arrives whole.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"2026-12-02T10:00:01Z stdout F tw").unwrap();
        f.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        f.write_all(b"o\n").unwrap();
        f.flush().unwrap();
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"two\n");
        f.write_all(b"2026-12-02T10:00:02Z stdout F three\n")
            .unwrap();
        running.store(false, Ordering::SeqCst);
        let written = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"three\n");
        assert_eq!(written, 14);
    }
}
