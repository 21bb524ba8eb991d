//! Facts about this machine that pods and their status need, read from `/proc`.

/// The first IPv4 address of this host that is not loopback (the pod's `hostIP`), from the
/// kernel's local routing table. Empty if none is found.
pub fn host_ip() -> String {
    let trie = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let mut last = "";
    for line in trie.lines() {
        let t = line.trim_start();
        if let Some(ip) = t.strip_prefix("|-- ") {
            last = ip.trim();
        } else if t.starts_with("/32 host LOCAL") && !last.starts_with("127.") && !last.is_empty() {
            return last.to_owned();
        }
    }
    String::new()
}

/// CPUs this process may use (the node's `cpu` capacity).
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A field of /proc/meminfo in bytes (`MemTotal`, `MemAvailable`), if readable.
pub fn meminfo_bytes(field: &str) -> Option<u64> {
    let prefix = format!("{field}:");
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Total memory in bytes (`MemTotal` of /proc/meminfo); 0 if unknown.
pub fn memory_bytes() -> i64 {
    meminfo_bytes("MemTotal").map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_machine_has_memory_and_an_address() {
        assert!(super::memory_bytes() > 0);
        // Every machine this runs on (CI included) has a non-loopback address.
        let ip = super::host_ip();
        assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "host IP {ip:?}");
    }
}
