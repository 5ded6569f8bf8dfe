//! Launch helpers shared by the families: checked narrowing of sizes to the kernels' integer
//! types, grid sizes, and the `util.cu` kernels (buffer fill, copy).

use crate::compile::Family;
use crate::error::DriverContext;
use crate::{Device, Error, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

/// `v` as the `int` a kernel takes; [`Error::Invalid`] (overflow) when it does not fit.
pub(crate) fn dim_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Invalid(tessera_core::Error::Overflow {
            what: format!("{what} = {v} does not fit the kernels' 32-bit index"),
        })
    })
}

/// Blocks of `per` items covering `n`, as a grid dimension (x: up to 2³¹ − 1; y and z: up to
/// 65535, pass `y_or_z`).
pub(crate) fn grid(what: &str, n: usize, per: usize, y_or_z: bool) -> Result<u32> {
    let blocks = n.div_ceil(per.max(1));
    let max = if y_or_z { 65_535 } else { i32::MAX as usize };
    if blocks > max {
        return Err(Error::Invalid(tessera_core::Error::Overflow {
            what: format!("{what}: {blocks} blocks exceed the grid limit {max}"),
        }));
    }
    Ok(blocks as u32)
}

/// Grid-stride launch shape for `n` items: 256 threads, at most 8 blocks per SM.
pub(crate) fn grid_stride(dev: &Device, n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(256)
        .clamp(1, dev.info().sm_count.max(1) as usize * 8);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Fills `buf` (any 4-byte element type) with the bit pattern `pattern`: the tests poison
/// outputs with a NaN pattern so an element a kernel never writes is caught.
pub fn fill_u32<T, S: DevicePtrMut<T>>(dev: &Device, buf: &mut S, pattern: u32) -> Result<()> {
    if std::mem::size_of::<T>() != 4 {
        return Err(Error::Unsupported(
            "fill_u32 fills buffers of 4-byte elements".into(),
        ));
    }
    let n = buf.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(Family::Util, "util_fill_u32")?;
    let cfg = grid_stride(dev, n as usize);
    let stream = dev.stream();
    let (ptr, _record) = buf.device_ptr_mut(stream);
    let mut b = stream.launch_builder(&f);
    b.arg(&ptr).arg(&n).arg(&pattern);
    // SAFETY: util_fill_u32(uint32_t*, uint64_t, uint32_t) writes the first n 4-byte words of
    // `buf`, which holds n elements of 4 bytes.
    unsafe { b.launch(cfg) }.ctx(|| "launching util_fill_u32".into())?;
    Ok(())
}

/// Copies `src` into `dst` (both `len` bytes, a multiple of 16) with the 16-byte copy kernel.
pub fn copy_v4<S: DevicePtr<u8>, D: DevicePtrMut<u8>>(
    dev: &Device,
    src: &S,
    dst: &mut D,
) -> Result<()> {
    tessera_core::shape::check_len("copy destination", src.len(), dst.len())?;
    if src.len() % 16 != 0 {
        return Err(Error::Invalid(tessera_core::Error::InvalidArgument(
            format!(
                "copy_v4 copies whole 16-byte vectors; {} bytes given",
                src.len()
            ),
        )));
    }
    let n = (src.len() / 16) as u64;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function(Family::Util, "util_copy_v4")?;
    let cfg = grid_stride(dev, n as usize);
    let stream = dev.stream();
    let (s, _rs) = src.device_ptr(stream);
    let (d, _rd) = dst.device_ptr_mut(stream);
    if s % 16 != 0 || d % 16 != 0 {
        return Err(Error::Unsupported(
            "copy_v4 needs 16-byte aligned buffers".into(),
        ));
    }
    let mut b = stream.launch_builder(&f);
    b.arg(&s).arg(&d).arg(&n);
    // SAFETY: util_copy_v4(const uint4*, uint4*, uint64_t) reads and writes n 16-byte
    // vectors; both buffers hold 16·n bytes and are 16-byte aligned (checked above).
    unsafe { b.launch(cfg) }.ctx(|| "launching util_copy_v4".into())?;
    Ok(())
}
