//! Kubernetes resource quantities (`100m`, `1.5`, `128Mi`, `1G`, `1e3`) as integers, the way the
//! kubelet turns them into CRI resources: CPU in millicores, everything else in units (bytes).
//!
//! Written here rather than taken from a crate: it is 60 lines, and the crates that parse
//! quantities pull in a decimal library for the general case we do not need.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a Kubernetes quantity")]
pub struct QuantityError(pub String);

/// The quantity as a decimal number: mantissa × 10^exp10 × 2^exp2.
fn parse(q: &str) -> Result<(f64, i32, i32), QuantityError> {
    let err = || QuantityError(q.to_owned());
    let s = q.trim();
    if s.is_empty() {
        return Err(err());
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| err())?;
    let (exp10, exp2) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        e if e.starts_with(['e', 'E']) => (e[1..].parse().map_err(|_| err())?, 0),
        _ => return Err(err()),
    };
    if !value.is_finite() || value < 0.0 {
        return Err(err());
    }
    Ok((value, exp10, exp2))
}

fn scaled(q: &str, extra_exp10: i32) -> Result<i64, QuantityError> {
    let (v, e10, e2) = parse(q)?;
    let x = v * 10f64.powi(e10 + extra_exp10) * 2f64.powi(e2);
    // Kubernetes rounds up to the smallest representable unit.
    let r = (x - 1e-9).ceil();
    if r > i64::MAX as f64 {
        return Err(QuantityError(q.to_owned()));
    }
    Ok(r.max(0.0) as i64)
}

/// Millicores (CPU) or milli-units: `100m` → 100, `1.5` → 1500.
pub fn milli(q: &str) -> Result<i64, QuantityError> {
    scaled(q, 3)
}

/// Whole units (bytes for memory and storage), rounded up: `128Mi` → 134217728, `1G` → 10^9.
pub fn units(q: &str) -> Result<i64, QuantityError> {
    scaled(q, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_quantities() {
        assert_eq!(milli("100m"), Ok(100));
        assert_eq!(milli("1.5"), Ok(1500));
        assert_eq!(milli("2"), Ok(2000));
        assert_eq!(milli("1e-3"), Ok(1));
        assert_eq!(units("128Mi"), Ok(128 << 20));
        assert_eq!(units("1G"), Ok(1_000_000_000));
        assert_eq!(units("1.5Gi"), Ok(3 << 29));
        assert_eq!(units("1e3"), Ok(1000));
        assert_eq!(units("100m"), Ok(1), "rounded up");
        for bad in ["", "abc", "1x", "-1", "1Kib"] {
            assert!(units(bad).is_err(), "{bad}");
        }
    }
}
