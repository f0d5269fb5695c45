//! RoPE inverse frequencies, as transformers computes them (`rope_init_fn`), with the
//! "linear" and "llama3" scalings.

use cloudrm_loader::{LlamaConfig, RopeScaling};

/// `inv_freq[i] = 1 / theta^(2i / HS)` for `i < HS/2`, then scaled. (HS/2) f32.
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| (1.0 / (cfg.rope_theta as f64).powf((2 * i) as f64 / d as f64)) as f32)
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers 5.24 `ROPE_INIT_FUNCTIONS["llama3"]` for head_dim 128, theta 500000,
    /// factor 8, low 1, high 4, original context 8192 (Llama 3.1's settings).
    const HF_LLAMA3: [f64; 64] = [
        1.0,
        0.8146172165870667,
        0.663601279258728,
        0.5405809879302979,
        0.44036662578582764,
        0.3587302267551422,
        0.2922278344631195,
        0.2380538135766983,
        0.193922758102417,
        0.1579728126525879,
        0.12868738174438477,
        0.10483095049858093,
        0.08539710193872452,
        0.06956595182418823,
        0.05666961893439293,
        0.046164050698280334,
        0.03760603070259094,
        0.030634520575404167,
        0.02495540864765644,
        0.020329104736447334,
        0.016560440883040428,
        0.013490419834852219,
        0.010989529080688953,
        0.008952259086072445,
        0.00729266507551074,
        0.005940730683505535,
        0.00483942124992609,
        0.003942275885492563,
        0.0032114461064338684,
        0.0021665706299245358,
        0.0013718936825171113,
        0.0008567514596506953,
        0.0005248460220173001,
        0.0003126936499029398,
        0.0001785077911335975,
        9.556212171446532e-05,
        7.784655463183299e-05,
        6.341514381347224e-05,
        5.165906986803748e-05,
        4.208236714475788e-05,
        3.428102354519069e-05,
        2.7925909307668917e-05,
        2.2748929040972143e-05,
        1.8531669411459006e-05,
        1.5096217794052791e-05,
        1.2297638932068367e-05,
        1.0017868589784484e-05,
        8.160727702488657e-06,
        6.647869668086059e-06,
        5.415469331637723e-06,
        4.411534519022098e-06,
        3.593711880967021e-06,
        2.927499735960737e-06,
        2.3847917418606812e-06,
        1.9426925064180978e-06,
        1.5825507944100536e-06,
        1.289173155782919e-06,
        1.050182618200779e-06,
        8.554969213037111e-07,
        6.969025321268418e-07,
        5.677088097399974e-07,
        4.6246537976912805e-07,
        3.76732259610435e-07,
        3.068925877869333e-07,
    ];

    #[test]
    fn llama3_scaling_matches_transformers() {
        let text = r#"{"model_type": "llama", "hidden_size": 512, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 8, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;
        let cfg = LlamaConfig::from_json_str(text, "config.json").unwrap();
        let ours = inv_freq(&cfg);
        assert_eq!(ours.len(), 64);
        for (i, (&a, &b)) in ours.iter().zip(HF_LLAMA3.iter()).enumerate() {
            assert!(
                (a as f64 - b).abs() <= 2e-6 * b.abs(),
                "inv_freq[{i}]: {a} vs {b}"
            );
        }
    }

    #[test]
    fn plain_and_linear() {
        let text = r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 8, "rope_theta": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0}}"#;
        let cfg = LlamaConfig::from_json_str(text, "config.json").unwrap();
        // HS = 8: 1/10000^(2i/8) for i < 4, halved by the linear factor.
        let want = [1.0f32, 0.1, 0.01, 0.001].map(|x| x / 2.0);
        for (a, b) in inv_freq(&cfg).iter().zip(want) {
            assert!((a - b).abs() <= 1e-6 * b, "{a} vs {b}");
        }
    }
}
