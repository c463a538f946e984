//! ONNX export (opset 17, dynamic batch): the graph builder every layer kind emits its ops into.
//!
//! The protobuf messages below are the subset of `onnx.proto` the export writes, with the official
//! field numbers; prost does the encoding. Each layer kind implements [`ToOnnx`] next to its burn
//! module, mirroring its forward op for op, and a model's emission walks its module tree the same
//! way its forward does: the graph is derived from the one description of the model.

use std::path::Path;

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use prost::Message;

use crate::error::Result;
use crate::files::write_new;
use crate::models::ImageClassifier;
use crate::models::vit::{DeployVit, VisionTransformer};
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

pub(crate) fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), i, r#type: 2, ..Default::default() }
}

pub(crate) fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), ints: ints.to_vec(), r#type: 7, ..Default::default() }
}

pub(crate) fn attr_float(name: &str, f: f32) -> AttributeProto {
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

/// A layer (or a whole model) as ONNX ops: `x` names its input in the graph, the result names
/// its output. The emission mirrors the eval-mode forward of the burn module.
pub trait ToOnnx {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String>;
}

/// The graph being built: constants become initializers, each node gets a fresh output name.
#[derive(Default)]
pub struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    names: usize,
}

impl Graph {
    fn fresh(&mut self, hint: &str) -> String {
        self.names += 1;
        format!("{hint}_{}", self.names)
    }

    pub fn floats(&mut self, hint: &str, dims: Vec<i64>, values: &[f32]) -> String {
        let name = self.fresh(hint);
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(TensorProto { dims, data_type: 1, name: name.clone(), raw_data });
        name
    }

    pub fn scalar(&mut self, hint: &str, value: f32) -> String {
        self.floats(hint, vec![], &[value])
    }

    pub fn ints(&mut self, hint: &str, values: &[i64]) -> String {
        let name = self.fresh(hint);
        let raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(TensorProto { dims: vec![values.len() as i64], data_type: 7, name: name.clone(), raw_data });
        name
    }

    pub fn int_scalar(&mut self, hint: &str, value: i64) -> String {
        let name = self.fresh(hint);
        self.initializers.push(TensorProto { dims: vec![], data_type: 7, name: name.clone(), raw_data: value.to_le_bytes().to_vec() });
        name
    }

    pub fn tensor<const D: usize>(&mut self, hint: &str, t: Tensor<D>) -> String {
        let (dims, values) = host(t);
        self.floats(hint, dims, &values)
    }

    pub fn param<const D: usize>(&mut self, hint: &str, p: &Param<Tensor<D>>) -> String {
        self.tensor(hint, p.val())
    }

    pub fn op(&mut self, op: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
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

    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.ints("shape", shape);
        self.op("Reshape", &[x, &s], vec![])
    }

    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.op("Transpose", &[x], vec![attr_ints("perm", perm)])
    }

    pub fn gather(&mut self, x: &str, index: i64, axis: i64) -> String {
        let i = self.int_scalar("index", index);
        self.op("Gather", &[x, &i], vec![attr_int("axis", axis)])
    }

    /// `x[start..end]` along `axis`.
    pub fn slice(&mut self, x: &str, axis: i64, start: i64, end: i64) -> String {
        let (starts, ends, axes) = (self.ints("starts", &[start]), self.ints("ends", &[end]), self.ints("axes", &[axis]));
        self.op("Slice", &[x, &starts, &ends, &axes], vec![])
    }

    /// `x` padded with zeros: `pads` lists every axis's leading counts, then every axis's
    /// trailing counts (ONNX `Pad`).
    pub fn pad_zeros(&mut self, x: &str, pads: &[i64]) -> String {
        let pads = self.ints("pads", pads);
        self.op("Pad", &[x, &pads], vec![])
    }

    pub fn reduce_sum(&mut self, x: &str, axis: i64) -> String {
        let axes = self.ints("axes", &[axis]);
        self.op("ReduceSum", &[x, &axes], vec![attr_int("keepdims", 1)])
    }

    pub fn binary_scalar(&mut self, op: &str, x: &str, value: f32) -> String {
        let s = self.scalar("c", value);
        self.op(op, &[x, &s], vec![])
    }

    pub fn conv(&mut self, x: &str, conv: &Conv2d, pad: usize) -> String {
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

    /// (B, N, h·d) → (B, h, N, d).
    pub fn split_heads(&mut self, x: &str, n: usize, heads: usize, d: usize) -> String {
        let r = self.reshape(x, &[0, n as i64, heads as i64, d as i64]);
        self.transpose(&r, &[0, 2, 1, 3])
    }

    /// (B, h, N, d) → (B, N, h·d).
    pub fn merge_heads(&mut self, x: &str, n: usize, c: usize) -> String {
        let t = self.transpose(x, &[0, 2, 1, 3]);
        self.reshape(&t, &[0, n as i64, c as i64])
    }
}

/// An image classifier as an ONNX model: input `images` (batch, C, H, W), output `logits`.
pub fn classifier_proto(model: &impl ToOnnx, in_chans: usize, [height, width]: [usize; 2], classes: usize) -> Result<ModelProto> {
    let mut g = Graph::default();
    let logits = model.to_onnx(&mut g, "images")?;
    g.rename(&logits, "logits");
    let graph = GraphProto {
        node: g.nodes,
        name: "slabformer".into(),
        initializer: g.initializers,
        input: vec![value_info("images", &[batch_dim(), fixed(in_chans), fixed(height), fixed(width)])],
        output: vec![value_info("logits", &[batch_dim(), fixed(classes)])],
    };
    Ok(ModelProto {
        ir_version: 8,
        producer_name: "slabformer".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
    })
}

/// The deploy model as an ONNX model.
pub fn to_onnx(model: &DeployVit) -> Result<ModelProto> {
    let cfg = &model.config;
    classifier_proto(model, cfg.in_chans, [cfg.img_size; 2], cfg.num_classes)
}

/// A trained model as ONNX: RepBN/PRepBN models in their fused form, LayerNorm models (DeiT)
/// with their norms as `LayerNormalization`.
pub fn model_to_onnx(model: &VisionTransformer) -> Result<ModelProto> {
    let cfg = &model.config;
    classifier_proto(model, cfg.in_chans, [cfg.img_size; 2], cfg.num_classes)
}

/// Any image classifier with an ONNX walk (input `images` of its configured H×W). The trained
/// forms of RepBN/PRepBN models emit their fused form, LayerNorm models keep their norms.
pub fn classifier_to_onnx<M: ToOnnx + ImageClassifier>(model: &M) -> Result<ModelProto> {
    let c = model.image_config();
    classifier_proto(model, c.in_chans(), c.input_size(), c.num_classes())
}

/// Writes the ONNX file atomically; an existing file is kept unless `overwrite`.
pub fn export(model: &DeployVit, path: &Path, overwrite: bool) -> Result<()> {
    write_new(path, &to_onnx(model)?.encode_to_vec(), overwrite)
}

/// [`model_to_onnx`] written like [`export`].
pub fn export_model(model: &VisionTransformer, path: &Path, overwrite: bool) -> Result<()> {
    write_new(path, &model_to_onnx(model)?.encode_to_vec(), overwrite)
}

/// [`classifier_to_onnx`] written like [`export`].
pub fn export_classifier<M: ToOnnx + ImageClassifier>(model: &M, path: &Path, overwrite: bool) -> Result<()> {
    write_new(path, &classifier_to_onnx(model)?.encode_to_vec(), overwrite)
}
