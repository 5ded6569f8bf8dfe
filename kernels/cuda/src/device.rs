//! A CUDA device: context, stream, the compiled modules, and buffer transfers.

use crate::compile::{self, Family};
use crate::error::DriverContext;
use crate::{Error, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// What a kernel launcher needs to know about the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// The NVRTC target the kernels are compiled for (`sm_90a`, `sm_80`, ...).
    pub arch: String,
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// L2 cache size in bytes.
    pub l2_bytes: usize,
    /// The most dynamic shared memory one block may opt in to, in bytes.
    pub max_smem_per_block: usize,
    /// Global memory in bytes.
    pub total_mem: usize,
}

impl DeviceInfo {
    /// Whether the Hopper (`sm_90a`: `wgmma`, bulk tensor copies) code paths are compiled.
    pub fn has_sm90a(&self) -> bool {
        self.arch == "sm_90a"
    }
}

/// One GPU with its own stream. Kernels are compiled the first time a family is used (once per
/// process and architecture, see [`compile::compile`]) and loaded once per device.
///
/// Every kernel of this crate is enqueued on [`Device::stream`]; buffers made with
/// [`Device::upload`] / [`Device::alloc_zeros`] belong to that stream too.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Mutex<HashMap<Family, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(Family, String), CudaFunction>>,
    /// The dynamic shared-memory limit already raised for each kernel (one driver call per
    /// kernel and size, not per launch).
    smem_limits: Mutex<HashMap<(Family, String), usize>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("info", &self.info).finish()
    }
}

/// Whether the CUDA driver library can be loaded (checked without panicking: cudarc's loader
/// panics on a missing library).
pub fn driver_available() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the library by its known names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl Device {
    /// Opens GPU `ordinal`. [`Error::Unavailable`] when there is no driver, no such device,
    /// or the device is older than compute capability 8.0.
    pub fn new(ordinal: usize) -> Result<Device> {
        if !driver_available() {
            return Err(Error::Unavailable(
                "the CUDA driver library (libcuda.so) is not installed".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::Unavailable(format!("the CUDA driver did not initialize: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Unavailable(format!(
                "device {ordinal} asked for, the driver sees {count}"
            )));
        }
        let ctx =
            CudaContext::new(ordinal).ctx(|| format!("creating a context on device {ordinal}"))?;
        let attr = |a: CUdevice_attribute| {
            ctx.attribute(a)
                .ctx(|| format!("reading device attribute {a:?}"))
        };
        let cc = ctx
            .compute_capability()
            .ctx(|| "reading the compute capability".into())?;
        let arch = compile::arch_for(cc.0, cc.1)?;
        let info = DeviceInfo {
            name: ctx.name().ctx(|| "reading the device name".into())?,
            compute_capability: cc,
            arch,
            sm_count: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
            l2_bytes: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
            max_smem_per_block: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )? as usize,
            total_mem: ctx.total_mem().ctx(|| "reading the memory size".into())?,
        };
        // The context's default stream: every kernel of a device runs in order on it, and
        // cudarc adds no per-argument event records to each launch (it does once a context has
        // a second stream), which would cost microseconds on launches that take a few.
        let stream = ctx.default_stream();
        Ok(Device {
            ctx,
            stream,
            info,
            modules: Mutex::default(),
            functions: Mutex::default(),
            smem_limits: Mutex::default(),
        })
    }

    /// What this device is.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The stream every kernel of this device is launched on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The driver context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The module of `family`, compiled and loaded on first use.
    pub fn module(&self, family: Family) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(&family) {
            return Ok(m.clone());
        }
        let compiled = compile::compile(family, &self.info.arch)?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(compiled.cubin.clone()))
            .ctx(|| format!("loading the module of cuda/{}", family.file()))?;
        modules.insert(family, module.clone());
        Ok(module)
    }

    /// Kernel `name` of `family` (an `extern "C"` name in the `.cu` file).
    pub fn function(&self, family: Family, name: &str) -> Result<CudaFunction> {
        let key = (family, name.to_string());
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(f.clone());
        }
        let f = self
            .module(family)?
            .load_function(name)
            .ctx(|| format!("looking up kernel {name} in cuda/{}", family.file()))?;
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, f.clone());
        Ok(f)
    }

    /// Kernel `name` of `family`, allowed `smem_bytes` of dynamic shared memory (a block gets
    /// more than 48 KiB only after the limit is raised). [`Error::Unsupported`] when the device
    /// has less.
    pub fn function_with_smem(
        &self,
        family: Family,
        name: &str,
        smem_bytes: usize,
    ) -> Result<CudaFunction> {
        if smem_bytes > self.info.max_smem_per_block {
            return Err(Error::Unsupported(format!(
                "kernel {name} needs {smem_bytes} bytes of shared memory per block, {} has {}",
                self.info.name, self.info.max_smem_per_block
            )));
        }
        let f = self.function(family, name)?;
        let mut limits = self.smem_limits.lock().unwrap_or_else(|e| e.into_inner());
        let raised = limits
            .entry((family, name.to_string()))
            .or_insert(48 * 1024);
        if smem_bytes > *raised {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )
            .ctx(|| format!("raising the shared-memory limit of {name} to {smem_bytes} bytes"))?;
            *raised = smem_bytes;
        }
        Ok(f)
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .ctx(|| format!("uploading {} elements", host.len()))
    }

    /// A new device buffer of `len` zeroed elements.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .ctx(|| format!("allocating {len} elements"))
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: DeviceRepr, S: DevicePtr<T>>(&self, buf: &S) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(buf)
            .ctx(|| format!("downloading {} elements", buf.len()))
    }

    /// Waits for every kernel enqueued so far; a kernel fault is reported here.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .ctx(|| "synchronizing the stream (a kernel may have faulted)".into())
    }
}

/// The device the GPU tests run on: device 0, opened once per process. Where there is none,
/// prints one line saying why (once) and returns `None`, so the test passes as skipped.
pub fn test_device() -> Option<&'static Device> {
    static DEVICE: OnceLock<std::result::Result<Device, String>> = OnceLock::new();
    let dev = DEVICE.get_or_init(|| {
        Device::new(0).map_err(|e| {
            let reason = e.to_string();
            eprintln!("tessera-cuda: skipping GPU tests: {reason}");
            reason
        })
    });
    dev.as_ref().ok()
}
