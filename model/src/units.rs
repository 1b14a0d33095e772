//! Sizes and rates as operators write them ("64GiB", "2GB/s"): the one parser of every rdmig
//! command line (`rdmig`, `rdmig-sim`, the workload). Binary units are IEC (KiB, MiB, GiB,
//! TiB: powers of 1024), decimal units SI (kB, MB, GB, TB: powers of 1000); a bare letter (k,
//! M, G, T) is decimal too. Memory sizes are usually binary: write `MiB`.

/// Parses a byte size: a plain number of bytes, or a number with a decimal (kB, MB, GB, TB)
/// or binary (KiB, MiB, GiB, TiB) unit. Fractions are allowed ("1.5GiB").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number then a unit such as GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("size {s:?}: unknown unit {u:?}")),
    };
    let v = n * mult;
    if !(0.0..1.8e19).contains(&v) {
        return Err(format!("size {s:?} out of range"));
    }
    Ok(v.round() as u64)
}

/// Parses a rate in bytes per second: a size followed by "/s" ("2GB/s", "100MiB/s", "0").
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let body = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("ps"))
        .unwrap_or(t);
    parse_size(body).map_err(|e| format!("rate {s:?}: {e}"))
}

/// Human-readable bytes with a binary unit.
pub fn fmt_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

/// Human-readable rate in decimal units (bytes per second in, "x.xx GB/s" out).
pub fn fmt_rate(bytes_per_s: u64) -> String {
    let v = bytes_per_s as f64;
    if v >= 1e9 {
        format!("{:.2} GB/s", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.1} MB/s", v / 1e6)
    } else {
        format!("{:.0} kB/s", v / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("64GiB").unwrap(), 64 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("256M").unwrap(), 256_000_000);
        assert_eq!(parse_size("1.5k").unwrap(), 1500);
        assert!(parse_size("3 parsecs").is_err());
        assert!(parse_size("-1MiB").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("2GB/s").unwrap(), 2_000_000_000);
        assert_eq!(parse_rate("100MB/s").unwrap(), 100_000_000);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert_eq!(parse_rate("1MiB/s").unwrap(), 1 << 20);
    }
}
