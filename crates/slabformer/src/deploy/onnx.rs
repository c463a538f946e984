//! ONNX export of the fused deploy model (opset 17, dynamic batch).
//!
//! The protobuf messages below are the subset of `onnx.proto` the export writes, with the official
//! field numbers; prost does the encoding. The graph mirrors [`DeployVit::forward`] op for op.

use std::path::Path;

use burn::module::Param;
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use prost::Message;

use crate::error::{Error, Result};
use crate::models::Pool;
use crate::models::vit::{DeployVit, VisionTransformer, VitConfig};
use crate::nn::attention::{Attention, DotAttention, FeatureMap, LinearAttention, Score, linear_order};
use crate::nn::mlp::Mlp;
use crate::nn::norm::{LayerNorm, Norm};
use crate::nn::patch_embed::PatchEmbed;
use crate::files::write_new;
use crate::state::host_f32;

pub const OPSET: i64 = 17;

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, tag = "2")]
    pub f: f32,
    #[prost(int64, tag = "3")]
    pub i: i64,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    /// 1 FLOAT, 2 INT, 7 INTS.
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    /// 1 FLOAT, 7 INT64.
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), i, r#type: 2, ..Default::default() }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), ints: ints.to_vec(), r#type: 7, ..Default::default() }
}

fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto { name: name.into(), f, r#type: 1, ..Default::default() }
}

fn host<const D: usize>(t: Tensor<D>) -> (Vec<i64>, Vec<f32>) {
    let dims = t.dims().iter().map(|&d| d as i64).collect();
    (dims, host_f32(t))
}

fn value_info(name: &str, dims: &[Dimension]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto { elem_type: 1, shape: Some(TensorShapeProto { dim: dims.to_vec() }) }),
        }),
    }
}

fn fixed(d: usize) -> Dimension {
    Dimension { dim_value: Some(d as i64), dim_param: None }
}

fn batch_dim() -> Dimension {
    Dimension { dim_value: None, dim_param: Some("batch".into()) }
}

/// Builds a graph: constants become initializers, each node gets a fresh output name.
#[derive(Default)]
struct Builder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    names: usize,
}

impl Builder {
    fn fresh(&mut self, hint: &str) -> String {
        self.names += 1;
        format!("{hint}_{}", self.names)
    }

    fn floats(&mut self, hint: &str, dims: Vec<i64>, values: &[f32]) -> String {
        let name = self.fresh(hint);
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(TensorProto { dims, data_type: 1, name: name.clone(), raw_data });
        name
    }

    fn scalar(&mut self, hint: &str, value: f32) -> String {
        self.floats(hint, vec![], &[value])
    }

    fn ints(&mut self, hint: &str, values: &[i64]) -> String {
        let name = self.fresh(hint);
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(TensorProto { dims: vec![values.len() as i64], data_type: 7, name: name.clone(), raw_data });
        name
    }

    fn int_scalar(&mut self, hint: &str, value: i64) -> String {
        let name = self.fresh(hint);
        self.initializers.push(TensorProto { dims: vec![], data_type: 7, name: name.clone(), raw_data: value.to_le_bytes().to_vec() });
        name
    }

    fn tensor<const D: usize>(&mut self, hint: &str, t: Tensor<D>) -> String {
        let (dims, values) = host(t);
        self.floats(hint, dims, &values)
    }

    fn param<const D: usize>(&mut self, hint: &str, p: &Param<Tensor<D>>) -> String {
        self.tensor(hint, p.val())
    }

    fn op(&mut self, op: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
        let output = self.fresh(&op.to_ascii_lowercase());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            name: output.clone(),
            op_type: op.into(),
            attribute,
        });
        output
    }

    /// Gives the node that produces `from` the output name `to` (the graph's named outputs).
    fn rename(&mut self, from: &str, to: &str) {
        for node in &mut self.nodes {
            for output in node.output.iter_mut().filter(|o| *o == from) {
                *output = to.into();
            }
        }
    }

    fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.ints("shape", shape);
        self.op("Reshape", &[x, &s], vec![])
    }

    fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op("Transpose", &[x], vec![attr_ints("perm", perm)])
    }

    fn gather(&mut self, x: &str, index: i64, axis: i64) -> String {
        let i = self.int_scalar("index", index);
        self.op("Gather", &[x, &i], vec![attr_int("axis", axis)])
    }

    fn reduce_sum(&mut self, x: &str, axis: i64) -> String {
        let axes = self.ints("axes", &[axis]);
        self.op("ReduceSum", &[x, &axes], vec![attr_int("keepdims", 1)])
    }

    fn binary_scalar(&mut self, op: &str, x: &str, value: f32) -> String {
        let s = self.scalar("c", value);
        self.op(op, &[x, &s], vec![])
    }

    /// burn's Linear (`W: [in, out]`) is exactly ONNX MatMul + Add.
    fn linear(&mut self, x: &str, layer: &Linear) -> String {
        let w = self.param("weight", &layer.weight);
        let y = self.op("MatMul", &[x, &w], vec![]);
        match &layer.bias {
            Some(b) => {
                let b = self.param("bias", b);
                self.op("Add", &[&y, &b], vec![])
            }
            None => y,
        }
    }

    fn conv(&mut self, x: &str, conv: &Conv2d, pad: usize) -> String {
        let w = self.param("conv_weight", &conv.weight);
        let [_, _, kh, kw] = conv.weight.dims();
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = &conv.bias {
            inputs.push(self.param("conv_bias", b));
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let p = pad as i64;
        self.op(
            "Conv",
            &refs,
            vec![
                attr_ints("kernel_shape", &[kh as i64, kw as i64]),
                attr_ints("strides", &conv.stride.map(|s| s as i64)),
                attr_ints("pads", &[p, p, p, p]),
                attr_int("group", conv.groups as i64),
            ],
        )
    }

    /// LayerNorm over the last axis.
    fn layer_norm(&mut self, x: &str, norm: &LayerNorm) -> String {
        let scale = self.param("ln_weight", &norm.weight);
        let bias = self.param("ln_bias", &norm.bias);
        self.op("LayerNormalization", &[x, &scale, &bias], vec![attr_int("axis", -1), attr_float("epsilon", norm.eps as f32)])
    }

    /// `norm(x)` where the block keeps a LayerNorm, `x` where it was folded away.
    fn maybe_norm(&mut self, x: &str, norm: Option<&LayerNorm>) -> String {
        match norm {
            Some(norm) => self.layer_norm(x, norm),
            None => x.to_string(),
        }
    }

    /// 0.5·x·(1 + erf(x/√2)), the exact GELU.
    fn gelu(&mut self, x: &str) -> String {
        let scaled = self.binary_scalar("Div", x, std::f32::consts::SQRT_2);
        let erf = self.op("Erf", &[&scaled], vec![]);
        let one_plus = self.binary_scalar("Add", &erf, 1.0);
        let prod = self.op("Mul", &[x, &one_plus], vec![]);
        self.binary_scalar("Mul", &prod, 0.5)
    }

    fn split_heads(&mut self, x: &str, n: usize, heads: usize, d: usize) -> String {
        let r = self.reshape(x, &[0, n as i64, heads as i64, d as i64]);
        self.transpose(&r, &[0, 2, 1, 3]) // (B, h, N, d)
    }

    fn merge_heads(&mut self, x: &str, n: usize, c: usize) -> String {
        let t = self.transpose(x, &[0, 2, 1, 3]);
        self.reshape(&t, &[0, n as i64, c as i64])
    }

    fn linear_attention(&mut self, x: &str, a: &LinearAttention) -> Result<String> {
        if let FeatureMap::Focused { .. } = a.feature_map {
            return Err(unsupported("FLatten focused attention"));
        }
        let [rows, cols] = a.grid;
        let n = rows * cols;
        let h = a.num_heads;
        let c = a.qkv.weight.dims()[0];
        let d = c / h;
        let qkv = self.linear(x, &a.qkv);
        let qkv = self.reshape(&qkv, &[0, n as i64, 3, c as i64]);
        let q = self.gather(&qkv, 0, 2);
        let k = self.gather(&qkv, 1, 2);
        let v = self.gather(&qkv, 2, 2);
        let pos = self.param("positional_encoding", &a.positional_encoding);
        let k = self.op("Add", &[&k, &pos], vec![]);
        let q = self.op("Relu", &[&q], vec![]);
        let k = self.op("Relu", &[&k], vec![]);
        let (q, k, v) = (self.split_heads(&q, n, h, d), self.split_heads(&k, n, h, d), self.split_heads(&v, n, h, d));
        let kt = self.transpose(&k, &[0, 1, 3, 2]);
        let numerator = if linear_order(n, n, d, d) {
            let kv = self.op("MatMul", &[&kt, &v], vec![]);
            self.op("MatMul", &[&q, &kv], vec![])
        } else {
            let qk = self.op("MatMul", &[&q, &kt], vec![]);
            self.op("MatMul", &[&qk, &v], vec![])
        };
        let k_sum = self.reduce_sum(&k, 2);
        let qk_sum = self.op("Mul", &[&q, &k_sum], vec![]);
        let denominator = self.reduce_sum(&qk_sum, 3);
        let denominator = self.binary_scalar("Add", &denominator, 1e-6);
        let out = self.op("Div", &[&numerator, &denominator], vec![]);
        // DWC on each head's v as a d-channel image, one conv shared by the heads.
        let image = self.reshape(&v, &[-1, n as i64, d as i64]);
        let image = self.transpose(&image, &[0, 2, 1]);
        let image = self.reshape(&image, &[-1, d as i64, rows as i64, cols as i64]);
        let pad = a.dwc.weight.dims()[2] / 2;
        let conv = self.conv(&image, &a.dwc, pad);
        let conv = self.reshape(&conv, &[-1, h as i64, d as i64, n as i64]);
        let conv = self.transpose(&conv, &[0, 1, 3, 2]);
        let out = self.op("Add", &[&out, &conv], vec![]);
        let merged = self.merge_heads(&out, n, c);
        Ok(self.linear(&merged, &a.proj))
    }

    fn dot_attention(&mut self, x: &str, a: &DotAttention, tokens: usize) -> Result<String> {
        let h = a.num_heads;
        let c = a.qkv.weight.dims()[0];
        let d = c / h;
        let qkv = self.linear(x, &a.qkv);
        let qkv = self.reshape(&qkv, &[0, tokens as i64, 3, h as i64, d as i64]);
        let qkv = self.transpose(&qkv, &[2, 0, 3, 1, 4]); // (3, B, h, N, d)
        let mut q = self.gather(&qkv, 0, 0);
        let mut k = self.gather(&qkv, 1, 0);
        let v = self.gather(&qkv, 2, 0);
        for (t, norm) in [(&mut q, &a.q_norm), (&mut k, &a.k_norm)] {
            if let Some(norm) = norm {
                *t = self.layer_norm(t, norm);
            }
        }
        let kt = self.transpose(&k, &[0, 1, 3, 2]);
        let scores = self.op("MatMul", &[&q, &kt], vec![]);
        let scores = self.binary_scalar("Mul", &scores, (d as f64).powf(-0.5) as f32);
        let weights = match a.score {
            Score::Softmax => self.op("Softmax", &[&scores], vec![attr_int("axis", -1)]),
            Score::ReluOverLength => {
                let r = self.op("Relu", &[&scores], vec![]);
                self.binary_scalar("Div", &r, tokens as f32)
            }
        };
        let out = self.op("MatMul", &[&weights, &v], vec![]);
        let mut out = self.merge_heads(&out, tokens, c);
        if let Some(gate) = &a.gate {
            let g = self.linear(x, gate);
            out = self.op("Mul", &[&out, &g], vec![]);
        }
        Ok(self.linear(&out, &a.proj))
    }
}

fn unsupported(what: &str) -> Error {
    Error::Config(format!("ONNX export of {what} is not supported yet; export the other attention kinds, or run the model in slabformer"))
}

/// What the graph is built from: the deploy model (no norms) or a LayerNorm model as trained.
struct Parts<'a> {
    config: &'a VitConfig,
    patch_embed: &'a PatchEmbed,
    cls_token: &'a Param<Tensor<3>>,
    pos_embed: &'a Param<Tensor<3>>,
    /// (norm1, attention, norm2, mlp) per block.
    blocks: Vec<(Option<&'a LayerNorm>, &'a Attention, Option<&'a LayerNorm>, &'a Mlp)>,
    norm: Option<&'a LayerNorm>,
    head: &'a Linear,
}

/// The deploy model as an ONNX model: input `images` (batch, C, H, W), output `logits`.
pub fn to_onnx(model: &DeployVit) -> Result<ModelProto> {
    build(Parts {
        config: &model.config,
        patch_embed: &model.patch_embed,
        cls_token: &model.cls_token,
        pos_embed: &model.pos_embed,
        blocks: model.blocks.iter().map(|b| (None, &b.attn, None, &b.mlp)).collect(),
        norm: None,
        head: &model.head,
    })
}

/// A trained model as ONNX: RepBN/PRepBN models in their fused form, LayerNorm models (DeiT)
/// with their norms as `LayerNormalization`.
pub fn model_to_onnx(model: &VisionTransformer) -> Result<ModelProto> {
    if let Ok(deploy) = model.fuse() {
        return to_onnx(&deploy);
    }
    fn layer_norm(norm: &Norm) -> Result<&LayerNorm> {
        match norm {
            Norm::LayerNorm(n) => Ok(n),
            _ => Err(Error::Config("a RepBN/PRepBN model that does not fuse cannot be exported".into())),
        }
    }
    let mut blocks = Vec::new();
    for b in &model.blocks {
        blocks.push((Some(layer_norm(&b.norm1)?), &b.attn, Some(layer_norm(&b.norm2)?), &b.mlp));
    }
    build(Parts {
        config: &model.config,
        patch_embed: &model.patch_embed,
        cls_token: &model.cls_token,
        pos_embed: &model.pos_embed,
        blocks,
        norm: Some(layer_norm(&model.norm)?),
        head: &model.head,
    })
}

fn build(model: Parts<'_>) -> Result<ModelProto> {
    let cfg = model.config;
    let (c, n) = (cfg.embed_dim, cfg.num_patches());
    let tokens = cfg.num_tokens();
    let mut g = Builder::default();
    let x = g.conv("images", &model.patch_embed.proj, 0); // (B, C, h, w)
    let x = g.reshape(&x, &[0, c as i64, n as i64]);
    let mut x = g.transpose(&x, &[0, 2, 1]); // (B, N, C)
    if cfg.pool == Pool::ClassToken {
        let shape = g.op("Shape", &["images"], vec![]);
        let (start, end) = (g.ints("start", &[0]), g.ints("end", &[1]));
        let batch = g.op("Slice", &[&shape, &start, &end], vec![]);
        let rest = g.ints("rest", &[1, c as i64]);
        let target = g.op("Concat", &[&batch, &rest], vec![attr_int("axis", 0)]);
        let cls = g.param("cls_token", model.cls_token);
        let cls = g.op("Expand", &[&cls, &target], vec![]);
        x = g.op("Concat", &[&cls, &x], vec![attr_int("axis", 1)]); // (B, N + 1, C)
    }
    let pos = g.param("pos_embed", model.pos_embed);
    x = g.op("Add", &[&x, &pos], vec![]);
    for (norm1, attn, norm2, mlp) in &model.blocks {
        let input = g.maybe_norm(&x, *norm1);
        let a = match attn {
            Attention::Linear(a) => g.linear_attention(&input, a)?,
            Attention::Dot(a) => g.dot_attention(&input, a, tokens)?,
        };
        x = g.op("Add", &[&x, &a], vec![]);
        let input = g.maybe_norm(&x, *norm2);
        let hidden = g.linear(&input, &mlp.fc1);
        let hidden = g.gelu(&hidden);
        let m = g.linear(&hidden, &mlp.fc2);
        x = g.op("Add", &[&x, &m], vec![]);
    }
    let x = g.maybe_norm(&x, model.norm);
    let pooled = match cfg.pool {
        Pool::Mean => g.op("ReduceMean", &[&x], vec![attr_ints("axes", &[1]), attr_int("keepdims", 0)]),
        Pool::ClassToken => g.gather(&x, 0, 1),
    };
    let logits = g.linear(&pooled, model.head);
    g.rename(&logits, "logits");
    let graph = GraphProto {
        node: g.nodes,
        name: "slabformer".into(),
        initializer: g.initializers,
        input: vec![value_info("images", &[batch_dim(), fixed(cfg.in_chans), fixed(cfg.img_size), fixed(cfg.img_size)])],
        output: vec![value_info("logits", &[batch_dim(), fixed(cfg.num_classes)])],
    };
    Ok(ModelProto {
        ir_version: 8,
        producer_name: "slabformer".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
    })
}

/// Writes the ONNX file atomically; an existing file is kept unless `overwrite`.
pub fn export(model: &DeployVit, path: &Path, overwrite: bool) -> Result<()> {
    write_new(path, &to_onnx(model)?.encode_to_vec(), overwrite)
}

/// [`model_to_onnx`] written like [`export`].
pub fn export_model(model: &VisionTransformer, path: &Path, overwrite: bool) -> Result<()> {
    write_new(path, &model_to_onnx(model)?.encode_to_vec(), overwrite)
}
