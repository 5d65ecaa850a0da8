use vpr_engine::device::kernels::KERNEL_MODULES;
use vpr_engine::device::nvrtc::{Nvrtc, Target};
#[test]
fn nv() {
    let n = Nvrtc::load().unwrap();
    println!("{:?} {}", n.version(), n.path());
    for m in KERNEL_MODULES {
        for arch in ["sm_80", "sm_90"] {
            let c = n.compile(m, Target::Cubin(arch), &["--ptxas-options=-v"]).unwrap();
            println!("{} {} {} bytes\n{}", m.name, arch, c.binary.len(), &c.log[..c.log.len().min(600)]);
        }
    }
}
