//! Command-line parsing helpers: sizes, RAM block specs, keys.

use std::net::SocketAddr;
use std::path::PathBuf;

pub use rdmig_model::units::{parse_rate, parse_size};

/// `NAME=PATH` (source) or `NAME=PATH:SIZE` (destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamSpec {
    pub name: String,
    pub path: PathBuf,
    pub size: Option<u64>,
}

pub fn parse_ram(s: &str) -> Result<RamSpec, String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("--ram {s:?}: expected NAME=PATH[:SIZE]"))?;
    if !rdmig_model::wire::valid_name(name.as_bytes()) {
        return Err(format!(
            "--ram {s:?}: block name must be 1..=64 of [A-Za-z0-9._:/-]"
        ));
    }
    let (path, size) = match rest.rsplit_once(':') {
        Some((p, sz)) if sz.chars().next().is_some_and(|c| c.is_ascii_digit()) => {
            (p, Some(parse_size(sz)?))
        }
        _ => (rest, None),
    };
    Ok(RamSpec {
        name: name.to_string(),
        path: PathBuf::from(path),
        size,
    })
}

/// Reads a pre-shared key file: its bytes, minus one trailing newline; at least 16 bytes.
pub fn read_psk(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let mut k =
        std::fs::read(path).map_err(|e| format!("reading key file {}: {e}", path.display()))?;
    if k.last() == Some(&b'\n') {
        k.pop();
    }
    if k.len() < 16 {
        return Err(format!(
            "key file {} holds {} bytes; at least 16 are required",
            path.display(),
            k.len()
        ));
    }
    Ok(k)
}

/// The key to use: a key file, or explicit `--insecure`. Without either, loopback addresses
/// run insecure with a warning and any other address is refused (spec: AUTH-4).
pub fn resolve_key(
    psk_file: Option<&std::path::Path>,
    insecure: bool,
    addr: SocketAddr,
) -> Result<Option<Vec<u8>>, String> {
    match (psk_file, insecure) {
        (Some(_), true) => Err("--psk-file and --insecure exclude each other".into()),
        (Some(p), false) => read_psk(p).map(Some),
        (None, true) => Ok(None),
        (None, false) if addr.ip().is_loopback() => {
            tracing::warn!("no --psk-file: running unauthenticated on loopback");
            Ok(None)
        }
        (None, false) => Err(format!(
            "{addr} is not a loopback address: give --psk-file, or --insecure to run without authentication"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("256MB"), Ok(256_000_000));
        assert_eq!(parse_size("64GiB"), Ok(64 << 30));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_rate("200MB/s"), Ok(200_000_000));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn ram_specs() {
        assert_eq!(
            parse_ram("pc.ram=/dev/shm/x:1GiB"),
            Ok(RamSpec {
                name: "pc.ram".into(),
                path: "/dev/shm/x".into(),
                size: Some(1 << 30)
            })
        );
        assert_eq!(parse_ram("a=/tmp/f").unwrap().size, None);
        assert!(parse_ram("bad name=/tmp/f").is_err());
        assert!(parse_ram("nopath").is_err());
    }

    #[test]
    fn auth_4_no_silent_insecure_default_off_loopback() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let other: SocketAddr = "10.1.2.3:1".parse().unwrap();
        assert_eq!(resolve_key(None, false, lo), Ok(None));
        assert!(resolve_key(None, false, other).is_err());
        assert_eq!(resolve_key(None, true, other), Ok(None));
    }
}
