/// Data-cache sizes used to choose blocking parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheInfo {
    /// L1 data cache per core, bytes.
    pub l1d: usize,
    /// L2 cache per core, bytes.
    pub l2: usize,
    /// Last-level cache (shared), bytes.
    pub l3: usize,
}

impl CacheInfo {
    /// Conservative sizes used when the system does not report its caches.
    pub const FALLBACK: CacheInfo = CacheInfo {
        l1d: 32 << 10,
        l2: 512 << 10,
        l3: 8 << 20,
    };

    /// This machine's caches (Linux sysfs), detected once; [`CacheInfo::FALLBACK`] elsewhere.
    pub fn detect() -> CacheInfo {
        static INFO: std::sync::OnceLock<CacheInfo> = std::sync::OnceLock::new();
        *INFO.get_or_init(|| Self::from_sysfs().unwrap_or(Self::FALLBACK))
    }

    fn from_sysfs() -> Option<CacheInfo> {
        let mut info = CacheInfo {
            l1d: 0,
            l2: 0,
            l3: 0,
        };
        for idx in 0..8 {
            let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{idx}");
            let Ok(level) = std::fs::read_to_string(format!("{dir}/level")) else {
                break;
            };
            let kind = std::fs::read_to_string(format!("{dir}/type")).unwrap_or_default();
            let size = std::fs::read_to_string(format!("{dir}/size")).ok()?;
            let size = parse_size(size.trim())?;
            match (level.trim(), kind.trim()) {
                ("1", "Data") => info.l1d = size,
                ("2", _) => info.l2 = size,
                ("3", _) => info.l3 = size,
                _ => {}
            }
        }
        let fb = Self::FALLBACK;
        // Guard against nonsense (e.g. a VM reporting 0): fall back per level.
        Some(CacheInfo {
            l1d: if info.l1d >= 8 << 10 {
                info.l1d
            } else {
                fb.l1d
            },
            l2: if info.l2 >= 64 << 10 { info.l2 } else { fb.l2 },
            l3: if info.l3 >= info.l2.max(1) {
                info.l3
            } else {
                fb.l3
            },
        })
    }
}

fn parse_size(s: &str) -> Option<usize> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("32K"), Some(32 << 10));
        assert_eq!(parse_size("1024K"), Some(1 << 20));
        assert_eq!(parse_size("32M"), Some(32 << 20));
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("xK"), None);
    }

    #[test]
    fn detected_sizes_are_ordered() {
        let c = CacheInfo::detect();
        assert!(c.l1d >= 8 << 10 && c.l2 >= 64 << 10 && c.l3 >= c.l2);
    }
}
