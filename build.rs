//! Builds the virtual GPU: every `kernels/*.cu` is compiled by the host C++ compiler with the
//! emulation header into one static library linked into the crate, so `vgpu` works from an
//! installed binary. Each kernel file is wrapped in its own C++ namespace, which gives it the
//! isolation of an NVRTC module (two files may define helpers with the same name), and a
//! generated dispatcher per file maps kernel names to launches.
//!
//! Structs marked `EMU_ABI_LAYOUT(Type, field, ...)` (kernels/include/device.cuh) get a layout
//! record per kernel file, listed in `vgpu_abi_layouts`, which src/device/abi.rs tests against
//! their Rust mirrors.
//!
//! Also generates `kernel_sources.rs`: the sources of every kernel file and header, embedded so
//! the CUDA backend compiles them with NVRTC at run time without any file on disk.
//!
//! `VPR_VGPU_ASAN=1` builds the virtual GPU with AddressSanitizer (see README).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::{env, fs};

/// A struct marked with `EMU_ABI_LAYOUT`: its name as written there and its fields in order.
struct AbiMarker {
    name: String,
    fields: Vec<String>,
}

/// What a `.cu` file declares, found in its preprocessed text so that what macros generate and
/// what the headers it includes declare count too.
struct KernelFile {
    /// The `extern "C" __global__` kernels.
    kernels: Vec<String>,
    /// The structs marked with `EMU_ABI_LAYOUT`, each once.
    abi: Vec<AbiMarker>,
}

fn scan_kernel_file(build: &cc::Build, include_dir: &Path, cu: &Path) -> KernelFile {
    let output = build
        .get_compiler()
        .to_command()
        .args([
            "-E",
            "-P",
            "-x",
            "c++",
            "-DCUDA_EMU",
            "-DEMU_LIST_KERNELS",
            "-I",
        ])
        .arg(include_dir)
        .arg(cu)
        .output()
        .unwrap_or_else(|e| panic!("running the C++ preprocessor on {}: {e}", cu.display()));
    assert!(
        output.status.success(),
        "preprocessing {} failed:\n{}",
        cu.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    KernelFile {
        kernels: kernel_names(&text),
        abi: abi_markers(&text, cu),
    }
}

fn kernel_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.find("EMU_KERNEL_ENTRY") {
        rest = &rest[pos + "EMU_KERNEL_ENTRY".len()..];
        let s = rest
            .trim_start()
            .strip_prefix("void")
            .expect("kernels return void")
            .trim_start();
        let end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        names.push(s[..end].to_string());
    }
    names
}

/// The `EMU_ABI_LAYOUT_OF Type(field, ...)` markers that `EMU_ABI_LAYOUT` leaves in the text.
fn abi_markers(text: &str, cu: &Path) -> Vec<AbiMarker> {
    let mut markers: Vec<AbiMarker> = Vec::new();
    for marker in text.split("EMU_ABI_LAYOUT_OF").skip(1) {
        let (name, rest) = marker
            .split_once('(')
            .unwrap_or_else(|| panic!("{}: EMU_ABI_LAYOUT without fields", cu.display()));
        let fields = rest.split_once(')').map_or("", |(f, _)| f);
        let m = AbiMarker {
            name: name.trim().to_string(),
            fields: fields.split(',').map(|f| f.trim().to_string()).collect(),
        };
        assert!(
            m.fields.iter().all(|f| !f.is_empty()),
            "{}: EMU_ABI_LAYOUT({}, ...) names an empty field",
            cu.display(),
            m.name
        );
        if !markers.iter().any(|x| x.name == m.name) {
            markers.push(m);
        }
    }
    markers
}

/// C++ that records the layouts of `markers` as the kernel file `module`'s build sees them, for
/// the inside of its namespace (where its own structs and the headers' are visible). Returns the
/// code and the names of the records.
fn abi_records(module: &str, markers: &[AbiMarker]) -> (String, Vec<String>) {
    let mut cpp = String::new();
    let mut records = Vec::new();
    for (i, m) in markers.iter().enumerate() {
        let record = format!("vgpu_abi_{module}_{i}");
        let fields: Vec<String> = m
            .fields
            .iter()
            .map(|f| {
                format!(
                    "{{{f:?}, offsetof({t}, {f}), sizeof({t}::{f})}}",
                    t = m.name
                )
            })
            .collect();
        writeln!(
            cpp,
            "static const emu::AbiField {record}_fields[] = {{{}}};\n\
             extern \"C\" const emu::AbiLayout {record} = {{{module:?}, {name:?}, sizeof({t}), \
             alignof({t}), {record}_fields, {n}}};",
            fields.join(", "),
            name = m.name,
            t = m.name,
            n = m.fields.len()
        )
        .unwrap();
        records.push(record);
    }
    (cpp, records)
}

fn sorted_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernels_dir = root.join("kernels");
    let include_dir = kernels_dir.join("include");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=VPR_VGPU_ASAN");

    let cu_files = sorted_files(&kernels_dir, "cu");
    let headers = sorted_files(&include_dir, "cuh");

    let mut sources_rs = String::from("pub static KERNEL_HEADERS: &[(&str, &str)] = &[\n");
    for h in &headers {
        let name = h.file_name().unwrap().to_str().unwrap();
        writeln!(
            sources_rs,
            "    ({name:?}, include_str!({:?})),",
            h.display().to_string()
        )
        .unwrap();
    }
    sources_rs.push_str("];\n\npub static KERNEL_MODULES: &[KernelModule] = &[\n");

    // The C table of kernel files (name, dispatcher, kernels) through which the virtual GPU, and
    // the fake CUDA driver of tests/fake_cuda, launch.
    let mut table_decls = String::new();
    let mut table_rows = String::new();
    let mut abi_records_all = Vec::new();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .include(&include_dir)
        .define("CUDA_EMU", None)
        .flag("-fno-strict-aliasing")
        .flag("-Wno-unknown-pragmas")
        .flag("-Wno-unused-parameter")
        .flag("-Wno-unused-function")
        // the note that GCC 4.6 changed how 64-byte-aligned arguments (TensorMap) are passed
        .flag("-Wno-psabi")
        .warnings(true)
        .opt_level(2)
        .file(include_dir.join("emu_runtime.cpp"));
    // AddressSanitizer for the kernels and the emulator (the Rust code is not instrumented, but
    // its heap is: libasan replaces malloc, so vgpu device buffers get red zones too). Linking
    // libasan as the first dynamic library of every test and binary of this package is enough:
    // no LD_PRELOAD and no ASAN_OPTIONS are needed. Use a target dir of its own:
    //   VPR_VGPU_ASAN=1 CARGO_TARGET_DIR=target/asan cargo test --test vgpu
    // (the whole suite also needs ASAN_OPTIONS=detect_leaks=0: NVRTC leaks at dlclose).
    if env::var("VPR_VGPU_ASAN").is_ok_and(|v| v == "1") {
        build
            .flag("-fsanitize=address")
            .flag("-fno-omit-frame-pointer")
            .opt_level(1);
        println!("cargo:rustc-link-lib=dylib=asan");
    }

    for cu in &cu_files {
        let module = cu.file_stem().unwrap().to_str().unwrap().to_string();
        let KernelFile {
            kernels: names,
            abi,
        } = scan_kernel_file(&build, &include_dir, cu);
        let (abi_cpp, records) = abi_records(&module, &abi);
        writeln!(
            sources_rs,
            "    KernelModule {{ name: {module:?}, source: include_str!({:?}), kernels: &{names:?} }},",
            cu.display().to_string()
        )
        .unwrap();

        let mut cpp = format!(
            "// generated by build.rs from {cu}\n#include \"common.cuh\"\n#include <cstring>\n\
             namespace vgpu_module_{module} {{\n#include \"{cu}\"\n{abi_cpp}}}\n\n\
             extern \"C\" int vgpu_launch_{module}(const char* kernel, emu::Dim3 grid, emu::Dim3 block, \
             unsigned smem, void** args, const emu::LaunchOptions* opt, char* err, size_t errlen) {{\n",
            cu = cu.display()
        );
        for k in &names {
            writeln!(
                cpp,
                "  if (!std::strcmp(kernel, \"{k}\")) return emu::launch(&vgpu_module_{module}::{k}, grid, block, smem, args, opt, err, errlen);"
            )
            .unwrap();
        }
        cpp.push_str("  return -1;\n}\n");
        let gen = out.join(format!("vgpu_{module}.cpp"));
        fs::write(&gen, cpp).unwrap();
        build.file(&gen);

        writeln!(
            table_decls,
            "extern \"C\" int vgpu_launch_{module}(const char*, emu::Dim3, emu::Dim3, unsigned, void**, \
             const emu::LaunchOptions*, char*, size_t);\nstatic const char* const {module}_kernels[] = {{{}}};",
            names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
        )
        .unwrap();
        writeln!(
            table_rows,
            "    {{{module:?}, vgpu_launch_{module}, {module}_kernels, {}}},",
            names.len()
        )
        .unwrap();
        for r in &records {
            writeln!(table_decls, "extern \"C\" const emu::AbiLayout {r};").unwrap();
        }
        abi_records_all.extend(records);
    }
    sources_rs.push_str("];\n");
    let table = format!(
        "// generated by build.rs: every kernel file of the virtual GPU\n#include \"common.cuh\"\n{table_decls}\n\
         extern \"C\" const emu::ModuleInfo vgpu_modules[] = {{\n{table_rows}}};\n\
         extern \"C\" const size_t vgpu_module_count = {};\n\
         extern \"C\" const emu::AbiLayout* const vgpu_abi_layouts[] = {{{}nullptr}};\n",
        cu_files.len(),
        abi_records_all
            .iter()
            .map(|r| format!("&{r}, "))
            .collect::<String>()
    );
    let table_cpp = out.join("vgpu_modules.cpp");
    fs::write(&table_cpp, table).unwrap();
    build.file(&table_cpp);

    fs::write(out.join("kernel_sources.rs"), sources_rs).unwrap();
    // The fake CUDA driver of tests/fake_cuda links the virtual GPU's library into a libcuda.so.
    println!(
        "cargo:rustc-env=VPR_VGPU_LIBRARY={}",
        out.join("libvgpu_kernels.a").display()
    );
    build.compile("vgpu_kernels");
}
