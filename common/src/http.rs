//! Small HTTP helpers shared by the local API servers.

/// Decodes `%XX` escapes and `+` (a space in query strings). Invalid escapes are kept as-is.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A query string as decoded `(key, value)` pairs, in order.
pub fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// The first value of `key`.
pub fn query_value<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode() {
        let q = parse_query(Some(
            "labelSelector=app%20in%20(a%2Cb)&watch=1&x=a+b&bad=%zz&empty",
        ));
        assert_eq!(query_value(&q, "labelSelector"), Some("app in (a,b)"));
        assert_eq!(query_value(&q, "watch"), Some("1"));
        assert_eq!(query_value(&q, "x"), Some("a b"));
        assert_eq!(query_value(&q, "bad"), Some("%zz"));
        assert_eq!(query_value(&q, "empty"), Some(""));
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
