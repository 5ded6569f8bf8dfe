use tessera_core::{Error, Result};

/// An instruction-set variant of the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Portable scalar code.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F (with the AVX2 baseline).
    Avx512,
    /// AArch64 Advanced SIMD.
    Neon,
}

impl Isa {
    /// Every variant, in order of preference from worst to best.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];

    /// Lower-case name (`scalar`, `avx2`, `avx512`, `neon`).
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Whether this CPU (and this build's target architecture) can run the variant.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_available() && std::arch::is_x86_feature_detected!("avx512f")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The variants this CPU can run, worst first.
    pub fn available() -> Vec<Isa> {
        Self::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The best variant for this CPU; detected once and cached.
    pub fn detect() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            [Isa::Avx512, Isa::Avx2, Isa::Neon]
                .into_iter()
                .find(|i| i.is_available())
                .unwrap_or(Isa::Scalar)
        })
    }

    /// Whether this CPU runs 512-bit FMAs as two 256-bit halves, so that an AVX-512 kernel
    /// has no more FMA throughput than an AVX2 one: AMD Zen 4 (family 19h with AVX-512F; Zen 3
    /// shares the family but has no AVX-512). Detected once (CPUID) and cached; `false`
    /// elsewhere, and off x86-64.
    pub fn avx512_is_double_pumped() -> bool {
        static PUMPED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *PUMPED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::x86_64::__cpuid;
                let v = __cpuid(0);
                let amd = (v.ebx, v.edx, v.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163);
                let eax = __cpuid(1).eax;
                let base = (eax >> 8) & 0xf;
                let family = if base == 0xf {
                    base + ((eax >> 20) & 0xff)
                } else {
                    base
                };
                amd && family == 0x19 && Isa::Avx512.is_available()
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                false
            }
        })
    }

    /// `Ok(self)` if available, else [`Error::IsaUnavailable`].
    pub fn check(self) -> Result<Isa> {
        if self.is_available() {
            Ok(self)
        } else {
            Err(Error::IsaUnavailable { isa: self.name() })
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = Error;
    fn from_str(s: &str) -> Result<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::InvalidArgument(format!("unknown instruction set {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detected_isa_is_available_and_scalar_always_is() {
        assert!(Isa::detect().is_available());
        assert!(Isa::available().contains(&Isa::Scalar));
        assert!(Isa::available().contains(&Isa::detect()));
    }

    #[test]
    fn families_prefer_an_available_isa() {
        // Double-pumped AVX-512 is only reported where AVX-512 exists.
        assert!(!Isa::avx512_is_double_pumped() || Isa::Avx512.is_available());
        let g = crate::gemm::preferred_isa();
        assert!(g.is_available());
        let want = if Isa::avx512_is_double_pumped() {
            Isa::Avx2
        } else {
            Isa::detect()
        };
        assert_eq!(g, want);
        let q = crate::quant::preferred_isa();
        assert!(crate::quant::is_available(q));
        assert!(q == Isa::detect() || !crate::quant::is_available(Isa::detect()));
    }

    #[test]
    fn unavailable_isa_is_an_error() {
        for isa in Isa::ALL {
            assert_eq!(isa.check().is_ok(), isa.is_available());
        }
        // No CPU is both x86-64 and AArch64.
        assert!(!(Isa::Avx2.is_available() && Isa::Neon.is_available()));
    }

    #[test]
    fn names_round_trip() {
        for isa in Isa::ALL {
            assert_eq!(isa.name().parse::<Isa>().unwrap(), isa);
        }
        assert!("sse9".parse::<Isa>().is_err());
    }
}
