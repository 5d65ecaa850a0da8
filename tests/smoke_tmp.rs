use vpr_engine::{DType, Device, Tensor};
#[test]
fn smoke() {
    let v = Device::new("vgpu").unwrap();
    let a = Tensor::rand_uniform(&[33, 7], -1.0, 1.0, 3, DType::F32, &Device::Cpu).unwrap();
    let g = a.to_device(&v).unwrap();
    let gt = g.t().unwrap().contiguous().unwrap();
    let ct = a.t().unwrap().contiguous().unwrap();
    assert_eq!(gt.to_vec::<f32>().unwrap(), ct.to_vec::<f32>().unwrap());
    let h = g.to_dtype(DType::BF16).unwrap();
    let hc = a.to_dtype(DType::BF16).unwrap();
    assert_eq!(h.to_vec::<half::bf16>().unwrap(), hc.to_vec::<half::bf16>().unwrap());
    let f = Tensor::full(&[1000], 2.5, DType::F16, &v).unwrap();
    assert!(f.to_f64_vec().unwrap().iter().all(|&x| x == 2.5));
}
