//! The PyTorch pickle reader: a whole `torch.save` archive when the input
//! starts like a zip file, else a bare `data.pkl` over fixed storages.
//! Whatever the bytes, it must return (converted or refused), never panic,
//! overflow its stack, run away or allocate without bound.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tv_core::pickle::fuzzing::input(data);
});
