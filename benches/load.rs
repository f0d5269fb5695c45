//! Load time of the default model (mmap + header validation + weight handles; the
//! tokenizer load reported separately) and the time of one forward token (decode step
//! after a 32-token prompt), reference and fast kernels.
//!
//! `cargo bench --bench load` (fetches the default model into the cache on first use).

use std::hint::black_box;

use cloudrm::backend::Cpu;
use cloudrm::hub;
use cloudrm::loader::gguf::OutDtype;
use cloudrm::loader::safetensors::SafeTensors;
use cloudrm::loader::tokenizer::Tokenizer;
use cloudrm::model::{Llama, LogitsMode};
use criterion::{Criterion, criterion_group, criterion_main};

fn benches(c: &mut Criterion) {
    let dir = match hub::ensure_default_model(OutDtype::BF16) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("skipping load benches: default model unavailable: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("load");
    g.sample_size(20);
    g.bench_function("safetensors_open_validate", |b| {
        b.iter(|| black_box(SafeTensors::open(&dir.join("model.safetensors")).unwrap()))
    });
    g.bench_function("model_load_dir", |b| {
        b.iter(|| black_box(Llama::load_dir(&dir).unwrap()))
    });
    g.bench_function("tokenizer_load", |b| {
        b.iter(|| black_box(Tokenizer::from_dir(&dir).unwrap()))
    });
    g.finish();

    let model = Llama::load_dir(&dir).unwrap();
    let prompt: Vec<u32> = (0..32u32).map(|i| 100 + i * 7).collect();
    let mut g = c.benchmark_group("forward_token");
    g.sample_size(10);
    for (name, cpu) in [("fast", Cpu::fast()), ("reference", Cpu::reference())] {
        let mut sess = model.new_session(prompt.len() + 1, 64);
        model
            .forward(&cpu, &mut sess, &prompt, LogitsMode::None)
            .unwrap();
        g.bench_function(format!("bf16_decode_step_{name}"), |b| {
            b.iter(|| {
                sess.truncate(prompt.len());
                black_box(
                    model
                        .forward(&cpu, &mut sess, &[42], LogitsMode::Last)
                        .unwrap()[0],
                )
            })
        });
    }
    g.finish();
}

criterion_group!(load, benches);
criterion_main!(load);
