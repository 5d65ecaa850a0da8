//! The structs that Rust passes by value to kernels (and to the virtual GPU's launcher) have a
//! `#[repr(C)]` Rust mirror of a C++ definition. A field out of step on either side is not a
//! compile error anywhere: the kernel silently reads the wrong bytes. The test here compares each
//! mirror with the layout the virtual GPU's C++ compiler gives the C++ struct (size, alignment,
//! every field's offset and size), read from the records build.rs generates for the structs marked
//! with `EMU_ABI_LAYOUT` (see kernels/include/device.cuh).

use std::ffi::{c_char, CStr};

/// Mirrors `emu::AbiField` in kernels/include/emu.cuh.
#[repr(C)]
struct AbiField {
    name: *const c_char,
    offset: usize,
    size: usize,
}

/// Mirrors `emu::AbiLayout` in kernels/include/emu.cuh.
#[repr(C)]
struct AbiLayout {
    module: *const c_char,
    name: *const c_char,
    size: usize,
    align: usize,
    fields: *const AbiField,
    field_count: usize,
}

extern "C" {
    /// The layout records of every kernel file's build, ending with a null pointer (generated
    /// by build.rs into `vgpu_modules.cpp`).
    static vgpu_abi_layouts: [*const AbiLayout; 0];
}

/// A struct's layout: its size, alignment, and each field's name, offset and size in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StructLayout {
    pub name: String,
    pub size: usize,
    pub align: usize,
    pub fields: Vec<(String, usize, usize)>,
}

/// The layout of every struct marked with `EMU_ABI_LAYOUT`, as compiled for the virtual GPU, with
/// the kernel file whose build it comes from (a header's struct once per file that includes it).
pub(crate) fn cpp_layouts() -> Vec<(String, StructLayout)> {
    let text = |p: *const c_char| {
        // SAFETY: the records hold NUL-terminated string literals.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    let mut layouts = Vec::new();
    // SAFETY: build.rs generates `vgpu_abi_layouts` as an array of pointers to records with static
    // storage, terminated by a null pointer; each record's `fields` has `field_count` entries.
    unsafe {
        let mut next = std::ptr::addr_of!(vgpu_abi_layouts).cast::<*const AbiLayout>();
        while let Some(record) = (*next).as_ref() {
            let fields = std::slice::from_raw_parts(record.fields, record.field_count);
            layouts.push((
                text(record.module),
                StructLayout {
                    name: text(record.name),
                    size: record.size,
                    align: record.align,
                    fields: fields
                        .iter()
                        .map(|f| (text(f.name), f.offset, f.size))
                        .collect(),
                },
            ));
            next = next.add(1);
        }
    }
    layouts
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    /// The size of the field `f` selects (the closure only names the field; it never runs).
    fn field_size<S, F>(_: fn(&S) -> &F) -> usize {
        size_of::<F>()
    }

    /// `mirror!(RustType = "CppName": field, ...)`: the Rust struct's layout under the name the
    /// C++ side's `EMU_ABI_LAYOUT` gives it, fields in declaration order.
    macro_rules! mirror {
        ($rust:ty = $cpp:literal: $($field:ident),+ $(,)?) => {
            (stringify!($rust), StructLayout {
                name: $cpp.to_string(),
                size: size_of::<$rust>(),
                align: align_of::<$rust>(),
                fields: vec![$((
                    stringify!($field).to_string(),
                    offset_of!($rust, $field),
                    field_size(|s: &$rust| &s.$field),
                )),+],
            })
        };
    }

    /// Every `#[repr(C)]` Rust struct with its C++ name and fields in declaration order.
    ///
    /// To add a struct passed to kernels by value (e.g. `ConvParams` in kernels/conv.cu mirrored by
    /// `ConvParams` in src/ops/conv/gpu.rs), one line on each side:
    /// - C++, right after the struct: `EMU_ABI_LAYOUT(ConvParams, n, h, w, c);` (every field);
    /// - Rust, here: `mirror!(crate::ops::conv::gpu::ConvParams = "ConvParams": n, h, w, c),`
    ///   (the Rust struct and the fields it reads `pub(crate)`).
    ///
    /// The test fails for a `#[repr(C)]` struct in src/ that is not listed here, and for a marked
    /// C++ struct without a mirror.
    fn mirrors() -> Vec<(&'static str, StructLayout)> {
        vec![
            mirror!(crate::ops::StridedDesc = "Strided": rank, shape, strides),
            mirror!(crate::ops::matmul::gpu::GemmParams = "GemmParams":
                m, n, k, lda, ldb, ldc_m, ldc_n, batch_rank, batch_shape, batch_a, batch_b,
                batch_c, z0, alpha, beta),
            mirror!(crate::ops::attention::gpu::AttentionParams = "AttentionParams":
                heads, len, dim, q, k, v, o, g, scale),
            mirror!(crate::ops::conv::gpu::ConvShape = "ConvShape":
                n, h, w, c, o, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw, groups),
            mirror!(crate::ops::pool::gpu::PoolShape = "PoolShape":
                n, h, w, c, kernel, stride, pad, oh, ow),
            mirror!(crate::ops::interpolate::gpu::InterpShape = "InterpShape":
                n, h, w, c, oh, ow, step_h, step_w),
            mirror!(crate::train::optim::gpu::AdamScalars = "AdamScalars":
                decay, l2, beta1_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps),
            mirror!(crate::device::vgpu::Dim3 = "emu::Dim3": x, y, z),
            mirror!(crate::device::vgpu::LaunchOptions = "emu::LaunchOptions":
                seed, os_threads, stack_bytes, lenient_barrier),
            mirror!(crate::device::vgpu::ModuleInfo = "emu::ModuleInfo":
                name, launch, kernels, kernel_count),
            mirror!(AbiField = "emu::AbiField": name, offset, size),
            mirror!(AbiLayout = "emu::AbiLayout": module, name, size, align, fields, field_count),
        ]
    }

    /// How `want` (C++, of kernel file `module`) and `got` (Rust) differ, if they do.
    fn differences(module: &str, want: &StructLayout, got: &StructLayout) -> Vec<String> {
        let what = format!("{} (C++, in the build of kernels/{module}.cu)", want.name);
        let mut found = Vec::new();
        if (want.size, want.align) != (got.size, got.align) {
            found.push(format!(
                "{what}: size {} align {}, the Rust mirror size {} align {}",
                want.size, want.align, got.size, got.align
            ));
        }
        if want.fields.len() != got.fields.len() {
            found.push(format!(
                "{what}: {} fields listed in EMU_ABI_LAYOUT, {} in the Rust mirror's line",
                want.fields.len(),
                got.fields.len()
            ));
        }
        for ((cpp, c_off, c_size), (rust, r_off, r_size)) in want.fields.iter().zip(&got.fields) {
            if (c_off, c_size) != (r_off, r_size) {
                found.push(format!(
                    "{what}: field {cpp} at offset {c_off} size {c_size}, Rust's {rust} at \
                     offset {r_off} size {r_size}"
                ));
            }
        }
        found
    }

    /// Bytes of `layout` that no listed field covers, beyond alignment padding: a field left out
    /// of the list (so the field-by-field comparison would not see it).
    fn uncovered(layout: &StructLayout) -> Option<String> {
        let mut end = 0;
        for (name, offset, size) in &layout.fields {
            if *offset < end || offset - end >= layout.align {
                return Some(format!("before field {name}"));
            }
            end = offset + size;
        }
        (layout.size - end >= layout.align).then(|| "after the last field".to_string())
    }

    /// The names of the `#[repr(C)]` structs in the Rust sources under `dir`.
    fn repr_c_structs(dir: &std::path::Path, names: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                repr_c_structs(&path, names);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let source = std::fs::read_to_string(&path).unwrap();
                let mut lines = source.lines();
                while let Some(line) = lines.next() {
                    if line.trim() == "#[repr(C)]" {
                        // the struct line follows the attributes
                        if let Some(decl) = lines.find(|l| !l.trim_start().starts_with("#[")) {
                            if let Some((_, rest)) = decl.split_once("struct ") {
                                let mut name =
                                    rest.split(|c: char| !c.is_alphanumeric() && c != '_');
                                names.push(name.next().unwrap_or_default().to_string());
                            }
                        }
                    }
                }
            }
        }
    }

    /// Each mirror in [`mirrors`] has the size, alignment and field offsets and sizes of its C++
    /// struct, in every kernel file's build; every marked C++ struct and every `#[repr(C)]` Rust
    /// struct is mirrored. Adding a struct is one line on each side, as [`mirrors`] shows. C++
    /// names must be unique across kernel files (a header's struct is recorded once per file that
    /// includes it, and each record must agree). The layouts are the host compiler's, which CUDA
    /// matches for these plain types (integers, floats, pointers, fixed arrays).
    #[test]
    fn rust_mirrors_have_the_layout_of_the_cpp_structs() {
        let cpp = cpp_layouts();
        let mirrors = mirrors();
        let mut failures = Vec::new();
        for (_, rust) in &mirrors {
            let compiled: Vec<&(String, StructLayout)> =
                cpp.iter().filter(|(_, l)| l.name == rust.name).collect();
            if compiled.is_empty() {
                failures.push(format!(
                    "{}: no EMU_ABI_LAYOUT({}, ...) in kernels/ (write one after the struct)",
                    rust.name, rust.name
                ));
            }
            for (module, layout) in compiled {
                failures.extend(differences(module, layout, rust));
                if let Some(gap) = uncovered(layout) {
                    failures.push(format!(
                        "{}: bytes {gap} that no field in EMU_ABI_LAYOUT covers",
                        layout.name
                    ));
                }
            }
        }
        let mut unmirrored: Vec<&str> = cpp
            .iter()
            .map(|(_, layout)| layout.name.as_str())
            .filter(|name| !mirrors.iter().any(|(_, m)| m.name == *name))
            .collect();
        unmirrored.sort();
        unmirrored.dedup();
        for name in unmirrored {
            failures.push(format!(
                "{name} has EMU_ABI_LAYOUT in kernels/ but no mirror! line in src/device/abi.rs"
            ));
        }
        let mut repr_c = Vec::new();
        repr_c_structs(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut repr_c,
        );
        assert!(
            repr_c.len() >= mirrors.len(),
            "found only {repr_c:?} in src/"
        );
        let mirrored: Vec<&str> = mirrors
            .iter()
            .map(|(rust, _)| rust.rsplit("::").next().unwrap().trim())
            .collect();
        for name in repr_c {
            if !mirrored.contains(&name.as_str()) {
                failures.push(format!(
                    "#[repr(C)] struct {name} in src/ has no mirror! line in src/device/abi.rs"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn a_layout_difference_or_a_missing_field_is_found() {
        let cpp = StructLayout {
            name: "P".into(),
            size: 16,
            align: 8,
            fields: vec![("a".into(), 0, 8), ("b".into(), 8, 4)],
        };
        assert!(differences("m", &cpp, &cpp).is_empty());
        assert_eq!(uncovered(&cpp), None);
        let mut rust = cpp.clone();
        rust.fields[1].1 = 12;
        let found = differences("m", &cpp, &rust);
        assert!(
            found.len() == 1 && found[0].contains("field b at offset 8"),
            "{found:?}"
        );
        let mut rust = cpp.clone();
        rust.size = 24;
        assert_eq!(differences("m", &cpp, &rust).len(), 1);
        let without_a = StructLayout {
            fields: vec![("b".into(), 8, 4)],
            ..cpp.clone()
        };
        assert!(uncovered(&without_a).is_some());
        let without_b = StructLayout {
            fields: vec![("a".into(), 0, 8)],
            ..cpp
        };
        assert!(uncovered(&without_b).is_some());
    }
}
