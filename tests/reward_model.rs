//! Reward models from small random checkpoints in both layouts (CLoud's
//! `reward_base_model.` + dense-tanh `reward_head`, and Hugging Face's `score.weight`),
//! their rewards against a hand computation, and the errors of bad checkpoints.

mod common;

use cloudrm::Error;
use cloudrm::backend::Cpu;
use cloudrm::loader::Dtype;
use cloudrm::model::{
    CheckpointLayout, FeedbackMethod, Llama, LogitsMode, ModelError, RewardModel,
};
use common::Rng;
use common::tiny::{TinySpec, temp_dir, tiny_config, tiny_tensors, write_model};

const IDS: [u32; 6] = [1, 17, 4, 88, 23, 2];

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The trunk's final-normed hidden state at the last position (plain Llama load).
fn trunk_hidden(spec: &TinySpec) -> Vec<f32> {
    let dir = temp_dir("rm-trunk");
    write_model(&dir, &tiny_tensors(spec), &tiny_config(spec), Dtype::F32);
    let model = Llama::load_dir(&dir).unwrap();
    let mut sess = model.new_session(16, 16);
    model
        .forward(&Cpu::reference(), &mut sess, &IDS, LogitsMode::None)
        .unwrap();
    let h = sess.last_hidden().to_vec();
    std::fs::remove_dir_all(dir).ok();
    h
}

fn model_reward(rm: &RewardModel) -> f32 {
    let mut sess = rm.llama.new_session(16, 16);
    rm.llama
        .forward(&Cpu::fast(), &mut sess, &IDS, LogitsMode::None)
        .unwrap();
    let mut r = [0.0f32];
    let mut scratch = vec![0.0; rm.llama.config.hidden_size];
    rm.rewards(sess.last_hidden(), &mut r, &mut scratch)
        .unwrap();
    r[0]
}

fn cloud_tensors(spec: &TinySpec, rng: &mut Rng) -> (Tensors, Vec<f32>, Vec<f32>, Vec<f32>, f32) {
    let c = spec.hidden;
    let mut t: Tensors = tiny_tensors(spec)
        .into_iter()
        .map(|(n, s, d)| (format!("reward_base_model.{n}"), s, d))
        .collect();
    let dense_w = rng.vec(c * c, 0.3);
    let dense_b = rng.vec(c, 0.1);
    let out_w = rng.vec(c, 0.5);
    let out_b = 0.375;
    t.push((
        "reward_head.dense.weight".into(),
        vec![c, c],
        dense_w.clone(),
    ));
    t.push(("reward_head.dense.bias".into(), vec![c], dense_b.clone()));
    t.push((
        "reward_head.out_proj.weight".into(),
        vec![1, c],
        out_w.clone(),
    ));
    t.push(("reward_head.out_proj.bias".into(), vec![1], vec![out_b]));
    (t, dense_w, dense_b, out_w, out_b)
}

#[test]
fn cloud_layout_dense_tanh_head() {
    let spec = TinySpec {
        tied: false,
        ..Default::default()
    };
    let c = spec.hidden;
    let mut rng = Rng::new(99);
    let (tensors, dense_w, dense_b, out_w, out_b) = cloud_tensors(&spec, &mut rng);
    let dir = temp_dir("rm-cloud");
    let mut cfg = tiny_config(&spec);
    cfg["feedback_method"] = "teacher".into();
    cfg["base_model_name_or_path"] = "some/base".into();
    write_model(&dir, &tensors, &cfg, Dtype::F32);
    let rm = RewardModel::load_dir(&dir).unwrap();
    assert_eq!(rm.layout, CheckpointLayout::Cloud);
    assert_eq!(rm.method, FeedbackMethod::Cloud);
    // Hand computation in f64: out_w . tanh(W h + b) + out_b.
    let h = trunk_hidden(&spec);
    let want: f64 = (0..c)
        .map(|i| {
            let z: f64 = (0..c)
                .map(|j| dense_w[i * c + j] as f64 * h[j] as f64)
                .sum::<f64>()
                + dense_b[i] as f64;
            out_w[i] as f64 * z.tanh()
        })
        .sum::<f64>()
        + out_b as f64;
    let got = model_reward(&rm) as f64;
    assert!(
        (got - want).abs() < 1e-5 * want.abs().max(1.0),
        "reward {got} vs {want}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn sequence_classification_layout_linear_head() {
    let spec = TinySpec::default();
    let c = spec.hidden;
    let mut rng = Rng::new(5);
    let w = rng.vec(c, 0.5);
    let mut tensors = tiny_tensors(&spec);
    tensors.push(("score.weight".into(), vec![1, c], w.clone()));
    let dir = temp_dir("rm-score");
    write_model(&dir, &tensors, &tiny_config(&spec), Dtype::BF16);
    let rm = RewardModel::load_dir(&dir).unwrap();
    assert_eq!(rm.layout, CheckpointLayout::SequenceClassification);
    assert_eq!(rm.method, FeedbackMethod::Classic);
    // Same checkpoint in f32 for the hand computation; bf16 weights within bf16 tolerance.
    let h = trunk_hidden(&spec);
    let want: f64 = (0..c).map(|i| w[i] as f64 * h[i] as f64).sum();
    let got = model_reward(&rm) as f64;
    assert!(
        (got - want).abs() < 2e-2 * want.abs().max(1.0),
        "reward {got} vs {want}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn base_config_from_base_model_dir() {
    // A released-style CLoud config.json without Llama fields, pointing at a local base dir.
    let spec = TinySpec {
        tied: false,
        ..Default::default()
    };
    let root = temp_dir("rm-base");
    let base = root.join("base");
    let ckpt = root.join("ckpt");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(base.join("config.json"), tiny_config(&spec).to_string()).unwrap();
    let (tensors, ..) = cloud_tensors(&spec, &mut Rng::new(1));
    let cfg =
        serde_json::json!({"feedback_method": "vanilla", "base_model_name_or_path": "../base"});
    write_model(&ckpt, &tensors, &cfg, Dtype::F32);
    let rm = RewardModel::load_dir(&ckpt).unwrap();
    assert_eq!(rm.method, FeedbackMethod::Classic);
    // Without the base dir: a typed error naming the field.
    std::fs::remove_dir_all(&base).unwrap();
    let err = RewardModel::load_dir(&ckpt).unwrap_err();
    assert!(
        matches!(err, Error::Model(ModelError::BaseConfig { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("base_model_name_or_path"), "{err}");
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn bad_reward_checkpoints() {
    let spec = TinySpec::default();
    let dir = temp_dir("rm-bad");
    // No head at all.
    write_model(&dir, &tiny_tensors(&spec), &tiny_config(&spec), Dtype::F32);
    let err = RewardModel::load_dir(&dir).unwrap_err();
    assert!(
        matches!(err, Error::Model(ModelError::NoRewardHead { .. })),
        "{err}"
    );
    // Unknown feedback method.
    let mut tensors = tiny_tensors(&spec);
    tensors.push((
        "score.weight".into(),
        vec![1, spec.hidden],
        vec![0.0; spec.hidden],
    ));
    let mut cfg = tiny_config(&spec);
    cfg["feedback_method"] = "oracle".into();
    write_model(&dir, &tensors, &cfg, Dtype::F32);
    let err = RewardModel::load_dir(&dir).unwrap_err();
    assert!(
        matches!(err, Error::Model(ModelError::BadFeedbackMethod { .. })),
        "{err}"
    );
    // Head of the wrong width.
    let mut tensors = tiny_tensors(&spec);
    tensors.push((
        "score.weight".into(),
        vec![1, spec.hidden + 1],
        vec![0.0; spec.hidden + 1],
    ));
    write_model(&dir, &tensors, &tiny_config(&spec), Dtype::F32);
    let err = RewardModel::load_dir(&dir).unwrap_err();
    assert!(
        matches!(err, Error::Model(ModelError::ShapeMismatch { .. })),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}
