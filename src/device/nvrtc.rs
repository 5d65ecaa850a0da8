//! NVRTC, loaded at run time. Our own thin binding rather than cudarc's: we need CUBIN output
//! (cudarc's safe layer gives PTX only) and an explicit library path, so that the tests can use
//! the NVRTC from NVIDIA's PyPI wheel in `.cuda-tools/` on a machine with no CUDA installed.

use super::kernels::{KernelModule, KERNEL_HEADERS};
use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};

type Program = *mut std::ffi::c_void;
type Status = c_int;

/// The project-local folder where the test set-up installs NVIDIA's wheels (nvrtc, ptxas).
pub fn project_tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".cuda-tools")
}

/// Where the wheel puts libnvrtc inside a `pip --target` folder.
pub fn wheel_lib_dir(tools: &Path) -> PathBuf {
    tools.join("nvidia/cu13/lib")
}

pub struct Nvrtc {
    path: String,
    version: (i32, i32),
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Status,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status,
    destroy: unsafe extern "C" fn(*mut Program) -> Status,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    log: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    // Kept loaded for the lifetime of the function pointers above.
    _libs: Vec<libloading::Library>,
}

/// What to compile a module to.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// Machine code for one architecture (`sm_80`, `sm_90`); this also runs ptxas, so it is the
    /// only way to validate inline PTX.
    Cubin(&'a str),
    /// PTX for a virtual architecture (`compute_80`).
    Ptx(&'a str),
}

pub struct Compiled {
    pub binary: Vec<u8>,
    pub log: String,
}

/// libloading's message with the loader's own reason, which it keeps as the error's source.
fn dl_error(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(why) => format!("{e}: {why}"),
        None => e.to_string(),
    }
}

impl Nvrtc {
    /// Finds libnvrtc: `$VPR_NVRTC` (a path; when set, only that), else the project's
    /// `.cuda-tools/`, the loader path, then the toolkit folders (`$CUDA_HOME`, `$CUDA_PATH`,
    /// `/usr/local/cuda`): a CUDA install is not always registered with the loader, and without
    /// NVRTC `cuda` is unusable.
    pub fn load() -> Result<Nvrtc> {
        const SONAMES: [&str; 3] = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];
        let explicit = std::env::var("VPR_NVRTC").ok().filter(|p| !p.is_empty());
        let candidates: Vec<String> = match explicit {
            Some(p) => vec![p],
            None => {
                let mut c = Vec::new();
                let wheel = wheel_lib_dir(&project_tools_dir()).join("libnvrtc.so.13");
                if wheel.exists() {
                    c.push(wheel.display().to_string());
                }
                c.extend(SONAMES.map(String::from));
                let toolkits = ["CUDA_HOME", "CUDA_PATH"]
                    .iter()
                    .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
                    .chain([PathBuf::from("/usr/local/cuda")]);
                for root in toolkits {
                    for name in SONAMES {
                        let lib = root.join("lib64").join(name);
                        if lib.exists() {
                            c.push(lib.display().to_string());
                        }
                    }
                }
                c
            }
        };
        let mut errors = Vec::new();
        for c in &candidates {
            match Self::load_from(c) {
                Ok(n) => return Ok(n),
                Err(e) => errors.push(e),
            }
        }
        Err(Error::Cuda(format!(
            "NVRTC (libnvrtc.so) could not be loaded: {}. Install the CUDA toolkit, or NVIDIA's \
             wheel (pip install nvidia-cuda-nvrtc) and set VPR_NVRTC to its libnvrtc.so.*",
            errors.join("; ")
        )))
    }

    /// The library at `path`, or why it cannot be used.
    fn load_from(path: &str) -> std::result::Result<Nvrtc, String> {
        let mut libs = Vec::new();
        // libnvrtc dlopens its builtins library by name; loading it first from the same folder lets
        // that lookup succeed without LD_LIBRARY_PATH.
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            if let Some(builtins) = std::fs::read_dir(dir).ok().and_then(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libnvrtc-builtins.so"))
                })
            }) {
                // SAFETY: loading NVIDIA's library runs only its initialisers.
                libs.push(
                    unsafe { libloading::Library::new(&builtins) }
                        .map_err(|e| format!("{}: {}", builtins.display(), dl_error(&e)))?,
                );
            }
        }
        // SAFETY: as above.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| dl_error(&e))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol has the C signature of the NVRTC API declared in the field's type.
                *unsafe { lib.get($name) }.map_err(|e| format!("{path}: {}", dl_error(&e)))?
            };
        }
        let version_fn: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status =
            sym!(b"nvrtcVersion");
        let (mut major, mut minor) = (0, 0);
        // SAFETY: plain out-parameters.
        unsafe { version_fn(&mut major, &mut minor) };
        let n = Nvrtc {
            path: path.to_string(),
            version: (major, minor),
            create: sym!(b"nvrtcCreateProgram"),
            compile: sym!(b"nvrtcCompileProgram"),
            destroy: sym!(b"nvrtcDestroyProgram"),
            log_size: sym!(b"nvrtcGetProgramLogSize"),
            log: sym!(b"nvrtcGetProgramLog"),
            ptx_size: sym!(b"nvrtcGetPTXSize"),
            ptx: sym!(b"nvrtcGetPTX"),
            cubin_size: sym!(b"nvrtcGetCUBINSize"),
            cubin: sym!(b"nvrtcGetCUBIN"),
            error_string: sym!(b"nvrtcGetErrorString"),
            _libs: {
                libs.push(lib);
                libs
            },
        };
        Ok(n)
    }

    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn check(&self, status: Status, what: &str) -> Result<()> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString returns a static C string for any status.
        let msg = unsafe { CStr::from_ptr((self.error_string)(status)) }.to_string_lossy();
        Err(Error::Cuda(format!("NVRTC {what}: {msg}")))
    }

    /// Compiles one kernel file, with our headers supplied from memory (no include path).
    pub fn compile(
        &self,
        module: &KernelModule,
        target: Target,
        extra_options: &[&str],
    ) -> Result<Compiled> {
        let src = CString::new(module.source).expect("kernel source has no NUL");
        let name = CString::new(format!("{}.cu", module.name)).unwrap();
        let header_srcs: Vec<CString> = KERNEL_HEADERS
            .iter()
            .map(|(_, s)| CString::new(*s).unwrap())
            .collect();
        let header_names: Vec<CString> = KERNEL_HEADERS
            .iter()
            .map(|(n, _)| CString::new(*n).unwrap())
            .collect();
        let arch = match target {
            Target::Cubin(a) | Target::Ptx(a) => a,
        };
        let mut options: Vec<CString> = vec![
            CString::new(format!("--gpu-architecture={arch}")).unwrap(),
            CString::new("-std=c++17").unwrap(),
        ];
        options.extend(extra_options.iter().map(|o| CString::new(*o).unwrap()));
        let ptrs = |v: &[CString]| v.iter().map(|c| c.as_ptr()).collect::<Vec<_>>();
        let (hs, hn, opts) = (ptrs(&header_srcs), ptrs(&header_names), ptrs(&options));

        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the calls; `prog` is
        // destroyed below on every path.
        unsafe {
            self.check(
                (self.create)(
                    &mut prog,
                    src.as_ptr(),
                    name.as_ptr(),
                    hs.len() as c_int,
                    hs.as_ptr(),
                    hn.as_ptr(),
                ),
                "create",
            )?;
            let status = (self.compile)(prog, opts.len() as c_int, opts.as_ptr());
            let log = self.program_log(prog);
            let result = if status != 0 {
                Err(Error::Cuda(format!(
                    "NVRTC could not compile kernels/{}.cu for {arch}:\n{log}",
                    module.name
                )))
            } else {
                let (size_fn, get_fn) = match target {
                    Target::Cubin(_) => (self.cubin_size, self.cubin),
                    Target::Ptx(_) => (self.ptx_size, self.ptx),
                };
                let mut size = 0usize;
                self.check(size_fn(prog, &mut size), "output size")
                    .and_then(|_| {
                        let mut binary = vec![0u8; size];
                        self.check(get_fn(prog, binary.as_mut_ptr() as *mut c_char), "output")?;
                        if matches!(target, Target::Ptx(_)) {
                            binary.pop(); // PTX comes NUL-terminated
                        }
                        Ok(Compiled { binary, log })
                    })
            };
            (self.destroy)(&mut prog);
            result
        }
    }

    /// # Safety
    /// `prog` is a live program.
    unsafe fn program_log(&self, prog: Program) -> String {
        let mut size = 0usize;
        if (self.log_size)(prog, &mut size) != 0 || size == 0 {
            return String::new();
        }
        let mut buf = vec![0u8; size];
        (self.log)(prog, buf.as_mut_ptr() as *mut c_char);
        String::from_utf8_lossy(&buf[..size - 1]).trim().to_string()
    }
}
