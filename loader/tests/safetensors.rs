//! safetensors reader/writer and sharded checkpoints: round trips, zero-copy views, and
//! one test per bad input asserting its error variant.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use cloudrm_loader::LoaderError;
use cloudrm_loader::dtype::Dtype;
use cloudrm_loader::safetensors::{
    HugePageRoute, MAX_HEADER_LEN, SafeTensors, SafetensorsError, TensorView, WriteTensor,
    write_safetensors,
};
use cloudrm_loader::shards::ShardedSafeTensors;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cloudrm-st-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Raw file: u64 LE header length, header, data.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn open_raw(dir: &TempDir, bytes: &[u8]) -> Result<SafeTensors, LoaderError> {
    let p = dir.path().join("raw.safetensors");
    std::fs::write(&p, bytes).unwrap();
    SafeTensors::open(&p)
}

fn st_err(r: Result<SafeTensors, LoaderError>) -> SafetensorsError {
    match r {
        Err(LoaderError::Safetensors(e)) => e,
        Err(other) => panic!("expected a safetensors error, got {other}"),
        Ok(_) => panic!("expected an error, the file opened"),
    }
}

fn assert_inside(st: &SafeTensors, v: &TensorView<'_>) {
    let map = st.mapped_bytes().as_ptr_range();
    let data = v.data.as_ptr_range();
    assert!(
        map.start <= data.start && data.end <= map.end,
        "view `{}` not inside the mapping",
        v.name
    );
}

#[test]
fn round_trip_all_dtypes_and_metadata() {
    let dir = TempDir::new("roundtrip");
    let path = dir.path().join("model.safetensors");

    let a: Vec<f32> = (0..7).map(|i| i as f32 * 0.5 - 1.0).collect();
    let b: Vec<half::bf16> = (0..5)
        .map(|i| half::bf16::from_f32(i as f32 + 0.25))
        .collect();
    let c: Vec<half::f16> = (0..3).map(|i| half::f16::from_f32(-(i as f32))).collect();
    let d: Vec<i64> = vec![-1, 0, i64::MAX];
    let (a_b, b_b, c_b, d_b) = (
        f32_bytes(&a),
        bytemuck::cast_slice::<_, u8>(&b).to_vec(),
        bytemuck::cast_slice::<_, u8>(&c).to_vec(),
        d.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
    );
    // Odd sizes in an order that would misalign the F32 and I64 tensors if written as given.
    let tensors = [
        WriteTensor {
            name: "b.bf16",
            dtype: Dtype::BF16,
            shape: &[5],
            data: &b_b,
        },
        WriteTensor {
            name: "a.f32",
            dtype: Dtype::F32,
            shape: &[7, 1],
            data: &a_b,
        },
        WriteTensor {
            name: "z.empty",
            dtype: Dtype::F32,
            shape: &[0, 4],
            data: &[],
        },
        WriteTensor {
            name: "c.f16",
            dtype: Dtype::F16,
            shape: &[1, 3],
            data: &c_b,
        },
        WriteTensor {
            name: "d.i64",
            dtype: Dtype::I64,
            shape: &[3],
            data: &d_b,
        },
        WriteTensor {
            name: "s.scalar",
            dtype: Dtype::U8,
            shape: &[],
            data: &[42],
        },
    ];
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("note".to_string(), "héllo \"quoted\"".to_string());
    write_safetensors(&path, &tensors, Some(&meta)).unwrap();
    assert_eq!(
        dir.entries(),
        vec!["model.safetensors".to_string()],
        "no temp file left"
    );

    let st = SafeTensors::open(&path).unwrap();
    assert_eq!(st.path(), path.as_path());
    assert_eq!(st.metadata(), &meta);
    assert_eq!(
        st.names().collect::<Vec<_>>(),
        vec!["a.f32", "b.bf16", "c.f16", "d.i64", "s.scalar", "z.empty"]
    );
    // Header padded to 8 bytes.
    assert_eq!(st.data_start() % 8, 0);
    let bytes = st.mapped_bytes();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(header_len % 8, 0);

    let va = st.tensor("a.f32").unwrap();
    assert_eq!(va.shape, &[7, 1]);
    assert_eq!(va.numel(), 7);
    assert_eq!(va.as_f32().unwrap(), a.as_slice());
    assert_eq!(va.to_f32_vec().unwrap(), a);
    let vb = st.tensor("b.bf16").unwrap();
    assert_eq!(vb.as_bf16().unwrap(), b.as_slice());
    assert_eq!(
        vb.to_f32_vec().unwrap(),
        b.iter().map(|x| x.to_f32()).collect::<Vec<_>>()
    );
    let vc = st.tensor("c.f16").unwrap();
    assert_eq!(vc.as_f16().unwrap(), c.as_slice());
    assert_eq!(vc.to_f32_vec().unwrap(), vec![0.0, -1.0, -2.0]);
    let vd = st.tensor("d.i64").unwrap();
    assert_eq!(vd.dtype, Dtype::I64);
    assert_eq!(vd.data, d_b.as_slice());
    let ve = st.tensor("z.empty").unwrap();
    assert_eq!(ve.numel(), 0);
    assert!(ve.as_f32().unwrap().is_empty());
    let vs = st.tensor("s.scalar").unwrap();
    assert_eq!((vs.numel(), vs.data), (1, &[42u8][..]));
    assert!(matches!(
        vs.to_f32_vec(),
        Err(SafetensorsError::NotFloat {
            dtype: Dtype::U8,
            ..
        })
    ));

    let info = st.info("d.i64").unwrap();
    assert_eq!(info.range.len(), 24);
    assert_eq!(info.range.start % 8, 0, "I64 aligned to 8");
    assert_eq!(
        st.info("a.f32").unwrap().range.start % 4,
        0,
        "F32 aligned to 4"
    );
    assert!(st.info("nope").is_none());

    // Every view lies inside the mapping (zero copy).
    for name in st.names() {
        assert_inside(&st, &st.tensor(name).unwrap());
    }
}

#[test]
fn round_trip_without_metadata_and_overwrite() {
    let dir = TempDir::new("overwrite");
    let path = dir.path().join("w.safetensors");
    let one = f32_bytes(&[1.0]);
    write_safetensors(
        &path,
        &[WriteTensor {
            name: "x",
            dtype: Dtype::F32,
            shape: &[1],
            data: &one,
        }],
        None,
    )
    .unwrap();
    let two = f32_bytes(&[2.0, 3.0]);
    write_safetensors(
        &path,
        &[WriteTensor {
            name: "y",
            dtype: Dtype::F32,
            shape: &[2],
            data: &two,
        }],
        None,
    )
    .unwrap();
    let st = SafeTensors::open(&path).unwrap();
    assert!(st.metadata().is_empty());
    assert_eq!(st.names().collect::<Vec<_>>(), vec!["y"]);
    assert_eq!(st.tensor("y").unwrap().as_f32().unwrap(), &[2.0, 3.0]);
    // An empty checkpoint is valid too.
    write_safetensors(&path, &[], None).unwrap();
    assert!(SafeTensors::open(&path).unwrap().is_empty());
}

#[test]
fn truncated_file() {
    let dir = TempDir::new("trunc");
    let e = st_err(open_raw(&dir, &[1, 2, 3]));
    assert!(
        matches!(e, SafetensorsError::Truncated { len: 3, .. }),
        "{e}"
    );
    let e = st_err(open_raw(&dir, &[]));
    assert!(
        matches!(e, SafetensorsError::Truncated { len: 0, .. }),
        "{e}"
    );
}

#[test]
fn header_length_past_eof() {
    let dir = TempDir::new("pasteof");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let e = st_err(open_raw(&dir, &bytes));
    assert!(
        matches!(
            e,
            SafetensorsError::HeaderPastEof {
                header_len: 1000,
                file_len: 10,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn header_over_cap() {
    let dir = TempDir::new("cap");
    let mut bytes = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let e = st_err(open_raw(&dir, &bytes));
    assert!(matches!(e, SafetensorsError::HeaderTooLarge { .. }), "{e}");
    let e = st_err(open_raw(&dir, &u64::MAX.to_le_bytes()));
    assert!(matches!(e, SafetensorsError::HeaderTooLarge { .. }), "{e}");
}

#[test]
fn invalid_json_utf8_and_non_object() {
    let dir = TempDir::new("json");
    let e = st_err(open_raw(&dir, &raw_file("{\"a\": ", &[])));
    assert!(matches!(e, SafetensorsError::HeaderNotJson { .. }), "{e}");
    let e = st_err(open_raw(&dir, &raw_file("[1, 2]", &[])));
    assert!(matches!(e, SafetensorsError::HeaderNotObject { .. }), "{e}");
    let mut bad = raw_file("{\"\u{e9}\":1}", &[]);
    bad[10] = 0xff; // break the UTF-8 of the key
    let e = st_err(open_raw(&dir, &bad));
    assert!(matches!(e, SafetensorsError::HeaderNotUtf8 { .. }), "{e}");
    let e = st_err(open_raw(
        &dir,
        &raw_file(r#"{"__metadata__":{"k":1}}"#, &[]),
    ));
    assert!(matches!(e, SafetensorsError::BadMetadata { .. }), "{e}");
    let e = st_err(open_raw(
        &dir,
        &raw_file(r#"{"t":{"dtype":"F32","shape":[1]}}"#, &[0; 4]),
    ));
    assert!(
        matches!(e, SafetensorsError::MissingField { ref name, field: "data_offsets", .. } if name == "t"),
        "{e}"
    );
    let e = st_err(open_raw(
        &dir,
        &raw_file(
            r#"{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ),
    ));
    assert!(
        matches!(e, SafetensorsError::InvalidField { field: "shape", .. }),
        "{e}"
    );
}

#[test]
fn unknown_dtype() {
    let dir = TempDir::new("dtype");
    let e = st_err(open_raw(
        &dir,
        &raw_file(
            r#"{"t":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,2]}}"#,
            &[0; 2],
        ),
    ));
    assert!(
        matches!(e, SafetensorsError::UnknownDtype { ref name, ref dtype, .. } if name == "t" && dtype == "Q4_K"),
        "{e}"
    );
}

#[test]
fn byte_range_mismatch_with_shape() {
    let dir = TempDir::new("mismatch");
    let e = st_err(open_raw(
        &dir,
        &raw_file(
            r#"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            &[0; 12],
        ),
    ));
    assert!(
        matches!(e, SafetensorsError::ByteSizeMismatch { expected: 12, actual: 8, ref name, .. } if name == "t"),
        "{e}"
    );
    let e = st_err(open_raw(
        &dir,
        &raw_file(
            r#"{"t":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}}"#,
            &[0; 12],
        ),
    ));
    assert!(
        matches!(
            e,
            SafetensorsError::BadOffsets {
                begin: 8,
                end: 4,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn overlapping_tensors() {
    let dir = TempDir::new("overlap");
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let e = st_err(open_raw(&dir, &raw_file(h, &[0; 12])));
    assert!(
        matches!(e, SafetensorsError::Overlap { ref first, ref second, .. } if first == "a" && second == "b"),
        "{e}"
    );
    // A gap is accepted.
    let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
    let st = open_raw(&dir, &raw_file(h, &[0; 12])).unwrap();
    assert_eq!(st.len(), 2);
}

#[test]
fn shape_product_overflow() {
    let dir = TempDir::new("overflow");
    let big = u64::MAX / 2;
    let h = format!(r#"{{"t":{{"dtype":"F32","shape":[{big},4],"data_offsets":[0,0]}}}}"#);
    let e = st_err(open_raw(&dir, &raw_file(&h, &[])));
    assert!(
        matches!(e, SafetensorsError::ShapeOverflow { ref name, .. } if name == "t"),
        "{e}"
    );
    // The product fits but times the dtype size does not.
    let h = format!(r#"{{"t":{{"dtype":"F32","shape":[{big}],"data_offsets":[0,0]}}}}"#);
    let e = st_err(open_raw(&dir, &raw_file(&h, &[])));
    assert!(matches!(e, SafetensorsError::ShapeOverflow { .. }), "{e}");
}

#[test]
fn range_outside_data_section() {
    let dir = TempDir::new("oob");
    let e = st_err(open_raw(
        &dir,
        &raw_file(
            r#"{"t":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            &[0; 8],
        ),
    ));
    assert!(
        matches!(
            e,
            SafetensorsError::OutOfBounds {
                begin: 4,
                end: 12,
                data_len: 8,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn missing_tensor() {
    let dir = TempDir::new("missing");
    let st = open_raw(
        &dir,
        &raw_file(
            r#"{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            &[0],
        ),
    )
    .unwrap();
    let e = st.tensor("nope").unwrap_err();
    assert!(
        matches!(e, SafetensorsError::MissingTensor { ref file, ref name } if name == "nope" && file.ends_with("raw.safetensors")),
        "{e}"
    );
}

#[test]
fn wrong_dtype_view() {
    let dir = TempDir::new("wrongdtype");
    let st = open_raw(
        &dir,
        &raw_file(
            r#"{"t":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}} "#,
            &[0; 4],
        ),
    )
    .unwrap();
    let v = st.tensor("t").unwrap();
    let e = v.as_f32().unwrap_err();
    assert!(
        matches!(e, SafetensorsError::WrongDtype { expected: Dtype::F32, actual: Dtype::BF16, ref name, .. } if name == "t"),
        "{e}"
    );
    assert!(matches!(
        v.as_f16(),
        Err(SafetensorsError::WrongDtype {
            expected: Dtype::F16,
            ..
        })
    ));
    assert!(v.as_bf16().is_ok());
    let e = e.in_file(st.path());
    assert!(
        matches!(e, SafetensorsError::WrongDtype { ref file, .. } if file.ends_with("raw.safetensors"))
    );
}

#[test]
fn misaligned_view() {
    let dir = TempDir::new("misaligned");
    // Header of 8-multiple length so the data section is 8-aligned; the F32 starts at 1.
    let mut h = r#"{"pad":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"t":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}}"#.to_string();
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let data: Vec<u8> = std::iter::once(0u8)
        .chain(f32_bytes(&[1.5, -2.0]))
        .collect();
    let st = open_raw(&dir, &raw_file(&h, &data)).unwrap();
    let v = st.tensor("t").unwrap();
    assert_inside(&st, &v);
    let e = v.as_f32().unwrap_err();
    assert!(
        matches!(e, SafetensorsError::Misaligned { ref name, align: 4, .. } if name == "t"),
        "{e}"
    );
    // The copying path still works.
    assert_eq!(v.to_f32_vec().unwrap(), vec![1.5, -2.0]);
}

#[test]
fn write_into_missing_dir_errors_and_leaves_nothing() {
    let dir = TempDir::new("nodir");
    let path = dir.path().join("absent").join("m.safetensors");
    let e = write_safetensors(
        &path,
        &[WriteTensor {
            name: "x",
            dtype: Dtype::U8,
            shape: &[1],
            data: &[1],
        }],
        None,
    )
    .unwrap_err();
    assert!(matches!(e, LoaderError::Io { .. }), "{e}");
    assert!(dir.entries().is_empty());
}

#[test]
fn failed_write_leaves_no_file() {
    let dir = TempDir::new("badwrite");
    let path = dir.path().join("m.safetensors");
    let e = write_safetensors(
        &path,
        &[WriteTensor {
            name: "x",
            dtype: Dtype::F32,
            shape: &[2],
            data: &[0; 7],
        }],
        None,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            LoaderError::Safetensors(SafetensorsError::ViewSizeMismatch {
                expected: 8,
                actual: 7,
                ..
            })
        ),
        "{e}"
    );
    let twice = [
        WriteTensor {
            name: "x",
            dtype: Dtype::U8,
            shape: &[1],
            data: &[1],
        },
        WriteTensor {
            name: "x",
            dtype: Dtype::U8,
            shape: &[1],
            data: &[2],
        },
    ];
    let e = write_safetensors(&path, &twice, None).unwrap_err();
    assert!(
        matches!(
            e,
            LoaderError::Safetensors(SafetensorsError::DuplicateTensor { .. })
        ),
        "{e}"
    );
    assert!(dir.entries().is_empty(), "left: {:?}", dir.entries());
}

/// Write a two-shard checkpoint: a,b in shard 1; c in shard 2.
fn write_two_shards(dir: &Path) {
    let x = f32_bytes(&[1.0, 2.0]);
    let y = f32_bytes(&[3.0]);
    write_safetensors(
        &dir.join("model-00001-of-00002.safetensors"),
        &[
            WriteTensor {
                name: "a",
                dtype: Dtype::F32,
                shape: &[2],
                data: &x,
            },
            WriteTensor {
                name: "b",
                dtype: Dtype::F32,
                shape: &[1],
                data: &y,
            },
        ],
        None,
    )
    .unwrap();
    write_safetensors(
        &dir.join("model-00002-of-00002.safetensors"),
        &[WriteTensor {
            name: "c",
            dtype: Dtype::F32,
            shape: &[1, 1],
            data: &y,
        }],
        None,
    )
    .unwrap();
    let index = serde_json::json!({
        "metadata": {"total_size": 16},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        }
    });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_index_round_trip() {
    let dir = TempDir::new("shards");
    write_two_shards(dir.path());
    let sh = ShardedSafeTensors::open_dir(dir.path()).unwrap();
    assert_eq!(sh.files().len(), 2);
    assert_eq!(sh.names().collect::<Vec<_>>(), vec!["a", "b", "c"]);
    assert_eq!(sh.tensor("a").unwrap().as_f32().unwrap(), &[1.0, 2.0]);
    assert_eq!(sh.tensor("c").unwrap().as_f32().unwrap(), &[3.0]);
    assert_eq!(sh.info("c").unwrap().shape, vec![1, 1]);
    assert!(sh.info("zz").is_none());
    assert!(matches!(
        sh.tensor("zz"),
        Err(SafetensorsError::MissingTensor { .. })
    ));
    for name in sh.names() {
        let f = sh.file_of(name).unwrap();
        assert_inside(f, &sh.tensor(name).unwrap());
    }
}

#[test]
fn sharded_single_file_and_lone_file() {
    let dir = TempDir::new("single");
    let x = f32_bytes(&[5.0]);
    let t = [WriteTensor {
        name: "w",
        dtype: Dtype::F32,
        shape: &[1],
        data: &x,
    }];
    write_safetensors(&dir.path().join("model.safetensors"), &t, None).unwrap();
    let sh = ShardedSafeTensors::open_dir(dir.path()).unwrap();
    assert_eq!(sh.tensor("w").unwrap().as_f32().unwrap(), &[5.0]);

    let dir = TempDir::new("lone");
    write_safetensors(&dir.path().join("adapter.safetensors"), &t, None).unwrap();
    assert_eq!(ShardedSafeTensors::open_dir(dir.path()).unwrap().len(), 1);
    write_safetensors(&dir.path().join("other.safetensors"), &t, None).unwrap();
    let e = ShardedSafeTensors::open_dir(dir.path()).unwrap_err();
    assert!(
        matches!(
            e,
            LoaderError::Safetensors(SafetensorsError::AmbiguousCheckpoint { .. })
        ),
        "{e}"
    );
}

#[test]
fn sharded_no_checkpoint() {
    let dir = TempDir::new("empty");
    let e = ShardedSafeTensors::open_dir(dir.path()).unwrap_err();
    assert!(
        matches!(
            e,
            LoaderError::Safetensors(SafetensorsError::NoCheckpoint { .. })
        ),
        "{e}"
    );
}

#[test]
fn sharded_missing_shard_file() {
    let dir = TempDir::new("missingshard");
    write_two_shards(dir.path());
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = ShardedSafeTensors::open_dir(dir.path()).unwrap_err();
    assert!(
        matches!(e, LoaderError::Safetensors(SafetensorsError::MissingShard { ref shard, .. }) if shard == "model-00002-of-00002.safetensors"),
        "{e}"
    );
}

#[test]
fn sharded_tensor_missing_from_its_shard() {
    let dir = TempDir::new("notinshard");
    write_two_shards(dir.path());
    let index = serde_json::json!({"weight_map": {
        "a": "model-00001-of-00002.safetensors",
        "c": "model-00001-of-00002.safetensors",
    }});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let e = ShardedSafeTensors::open_dir(dir.path()).unwrap_err();
    assert!(
        matches!(e, LoaderError::Safetensors(SafetensorsError::TensorNotInShard { ref name, .. }) if name == "c"),
        "{e}"
    );
}

#[test]
fn sharded_invalid_index_and_duplicates() {
    let dir = TempDir::new("badindex");
    write_two_shards(dir.path());
    let idx = dir.path().join("model.safetensors.index.json");
    std::fs::write(&idx, "{not json").unwrap();
    let e = ShardedSafeTensors::open_dir(dir.path()).unwrap_err();
    assert!(
        matches!(
            e,
            LoaderError::Safetensors(SafetensorsError::BadIndex { .. })
        ),
        "{e}"
    );
    std::fs::write(&idx, r#"{"weight_map": {"a": "../escape.safetensors"}}"#).unwrap();
    let e = ShardedSafeTensors::open_dir(dir.path()).unwrap_err();
    assert!(
        matches!(
            e,
            LoaderError::Safetensors(SafetensorsError::BadIndex { .. })
        ),
        "{e}"
    );

    // The same tensor name in two shards: shard 2 holds `c` (as the index says) and `a`.
    let y = f32_bytes(&[3.0]);
    write_safetensors(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[
            WriteTensor {
                name: "a",
                dtype: Dtype::F32,
                shape: &[1],
                data: &y,
            },
            WriteTensor {
                name: "c",
                dtype: Dtype::F32,
                shape: &[1, 1],
                data: &y,
            },
        ],
        None,
    )
    .unwrap();
    let index = serde_json::json!({"weight_map": {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }});
    std::fs::write(&idx, index.to_string()).unwrap();
    let e = ShardedSafeTensors::open_dir(dir.path()).unwrap_err();
    assert!(
        matches!(e, LoaderError::Safetensors(SafetensorsError::DuplicateAcrossShards { ref name, .. }) if name == "a"),
        "{e}"
    );
}

/// `use_huge_pages` leaves every byte and view as it was, whatever route it takes; a
/// route that keeps the file mapping must leave it on 2 MiB pages as far as its
/// alignment allows, a copy must be resident; a second call finds the pages already
/// there (or keeps the copy).
#[test]
fn use_huge_pages_keeps_every_byte() {
    let dir = TempDir::new("hugepages");
    let path = dir.path().join("w.safetensors");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let a: Vec<u8> = (0..(13 << 20) + 5)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let tensors = [WriteTensor {
        name: "a",
        dtype: Dtype::U8,
        shape: &[a.len()],
        data: &a,
    }];
    write_safetensors(&path, &tensors, None).unwrap();
    let whole = std::fs::read(&path).unwrap();
    let mut st = SafeTensors::open(&path).unwrap();
    let first = st.use_huge_pages().unwrap();
    println!("use_huge_pages on a fresh file: {first:?}");
    check_route(&st, first, &whole);
    let v = st.tensor("a").unwrap();
    assert_inside(&st, &v);
    assert!(v.data == &a[..]);
    let second = st.use_huge_pages().unwrap();
    assert_eq!(
        second,
        if first == HugePageRoute::Copied {
            HugePageRoute::Copied
        } else {
            HugePageRoute::PageCache
        }
    );
    assert!(st.mapped_bytes() == &whole[..]);
    // A second reader of the same file maps what the first left in the page cache.
    let mut other = SafeTensors::open(&path).unwrap();
    let third = other.use_huge_pages().unwrap();
    if first != HugePageRoute::Copied {
        assert_eq!(third, HugePageRoute::PageCache);
    }
    assert!(other.tensor("a").unwrap().data == &a[..]);
    drop((st, other));
    // The file's cache dropped and read back through read(): in folios of readahead's
    // sizes, often smaller than 2 MiB, so this exercises the reread route where the
    // kernel has it.
    cloudrm_loader::pages::drop_file_cache(&path).unwrap();
    assert!(std::fs::read(&path).unwrap() == whole);
    let mut again = SafeTensors::open(&path).unwrap();
    let route = again.use_huge_pages().unwrap();
    println!("use_huge_pages after a read(): {route:?}");
    check_route(&again, route, &whole);
    drop(again);
    let mut sharded = ShardedSafeTensors::open_dir(dir.path()).unwrap();
    sharded.use_huge_pages().unwrap();
    let (huge, all) = sharded.huge_page_bytes().unwrap_or((0, whole.len()));
    assert!(huge <= all && all == whole.len());
    assert!(sharded.tensor("a").unwrap().data == &a[..]);
}

/// The file's bytes unchanged after `route`; the mapping resident for a copy, else on
/// 2 MiB pages as far as its alignment allows.
fn check_route(st: &SafeTensors, route: HugePageRoute, whole: &[u8]) {
    assert!(st.mapped_bytes() == whole, "{route:?} changed the bytes");
    assert_eq!(
        st.is_resident(),
        route == HugePageRoute::Copied,
        "{route:?}"
    );
    if route != HugePageRoute::Copied {
        let huge = st
            .huge_page_bytes()
            .expect("known on a route that checked it");
        assert!(
            cloudrm_loader::pages::covers(huge, whole.len()),
            "{route:?} with {huge} of {} bytes on 2 MiB pages",
            whole.len()
        );
    }
}

/// `make_resident` swaps the mapping for an anonymous copy: every tensor keeps its bytes
/// (a file of several copy steps, so the threads' parts and the steps' seams are
/// crossed), views still lie inside the (new) mapping, a second call copies nothing,
/// and releasing pages of the copy is a no-op (DONTNEED on anonymous memory would zero
/// them, unlike on the file mapping).
#[test]
fn make_resident_keeps_every_byte() {
    let dir = TempDir::new("resident");
    let path = dir.path().join("w.safetensors");
    // 70 MiB in three tensors of odd lengths, bytes that differ at every offset.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut bytes = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    let (a, b, c) = (bytes(33 << 20), bytes(4 * 7), bytes((37 << 20) - 4 * 3));
    let tensors = [
        WriteTensor {
            name: "a",
            dtype: Dtype::U8,
            shape: &[a.len()],
            data: &a,
        },
        WriteTensor {
            name: "b",
            dtype: Dtype::F32,
            shape: &[7],
            data: &b,
        },
        WriteTensor {
            name: "c",
            dtype: Dtype::U8,
            shape: &[c.len()],
            data: &c,
        },
    ];
    write_safetensors(&path, &tensors, None).unwrap();
    let mut st = SafeTensors::open(&path).unwrap();
    let whole = std::fs::read(&path).unwrap();
    assert!(!st.is_resident());
    assert_eq!(st.make_resident().unwrap(), whole.len());
    assert!(st.is_resident());
    assert!(
        st.mapped_bytes() == &whole[..],
        "the copy differs from the file"
    );
    for t in &tensors {
        let v = st.tensor(t.name).unwrap();
        assert_inside(&st, &v);
        assert!(v.data == t.data, "tensor {} changed", t.name);
    }
    assert_eq!(st.make_resident().unwrap(), 0);
    st.release_range(0, whole.len()).unwrap();
    assert!(st.mapped_bytes() == &whole[..], "release zeroed the copy");
    // Out-of-range releases are still refused.
    assert!(st.release_range(1, whole.len()).is_err());

    // Through a (single-file) checkpoint dir.
    let mut sharded = ShardedSafeTensors::open_dir(dir.path()).unwrap();
    assert_eq!(sharded.make_resident().unwrap(), whole.len());
    assert_eq!(sharded.make_resident().unwrap(), 0);
    assert!(sharded.tensor("c").unwrap().data == &c[..]);
}
