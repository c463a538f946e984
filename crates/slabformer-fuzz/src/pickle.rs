//! Valid `.pth` files written by hand (no PyTorch here): the pickle of a state dict whose
//! tensors are `torch._utils._rebuild_tensor_v2` calls on persistent storages, in the two
//! containers `torch.save` writes: the zip archive (PyTorch ≥ 1.6) and the legacy stream of
//! pickles followed by raw storages.

/// One tensor of a seed: name, shape, f32 values.
pub struct SeedTensor {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

fn unicode(out: &mut Vec<u8>, s: &str) {
    out.push(b'X'); // BINUNICODE
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn int(out: &mut Vec<u8>, v: usize) {
    out.push(b'J'); // BININT
    out.extend_from_slice(&(v as i32).to_le_bytes());
}

fn tuple(out: &mut Vec<u8>, items: &[usize]) {
    out.push(b'(');
    for &i in items {
        int(out, i);
    }
    out.push(b't');
}

/// The pickle of `{name: tensor}` (protocol 2); storage `i` holds tensor `i`. `legacy` adds
/// the sixth (view) field of the legacy persistent id.
fn state_dict_pickle(tensors: &[SeedTensor], legacy: bool, nested_under: Option<&str>) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    if let Some(key) = nested_under {
        p.push(b'}');
        unicode(&mut p, key);
    }
    p.extend_from_slice(b"ccollections\nOrderedDict\n)R");
    p.push(b'(');
    for (i, t) in tensors.iter().enumerate() {
        unicode(&mut p, t.name);
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        // The persistent id: ('storage', torch.FloatStorage, key, 'cpu', numel[, None]).
        p.push(b'(');
        unicode(&mut p, "storage");
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        unicode(&mut p, &i.to_string());
        unicode(&mut p, "cpu");
        int(&mut p, t.values.len());
        if legacy {
            p.push(b'N');
        }
        p.extend_from_slice(b"tQ");
        int(&mut p, 0); // storage offset
        tuple(&mut p, &t.shape);
        let mut stride = vec![1usize; t.shape.len()];
        for d in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * t.shape[d + 1];
        }
        tuple(&mut p, &stride);
        p.push(0x89); // NEWFALSE: requires_grad
        p.extend_from_slice(b"ccollections\nOrderedDict\n)R"); // backward hooks
        p.extend_from_slice(b"tR");
    }
    p.push(b'u'); // SETITEMS into the OrderedDict
    if nested_under.is_some() {
        p.push(b's');
    }
    p.push(b'.');
    p
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A legacy (PyTorch < 1.6) checkpoint.
pub fn legacy_pth(tensors: &[SeedTensor]) -> Vec<u8> {
    let mut out = vec![0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.'];
    out.extend_from_slice(&[0x80, 2, b'M', 0xe9, 0x03, b'.']); // protocol version 1001
    out.extend_from_slice(&[0x80, 2, b'}', b'(']);
    unicode(&mut out, "protocol_version");
    out.extend_from_slice(&[b'M', 0xe9, 0x03]);
    unicode(&mut out, "little_endian");
    out.push(0x88);
    out.extend_from_slice(b"u.");
    out.extend(state_dict_pickle(tensors, true, None));
    out.extend_from_slice(&[0x80, 2, b']', b'(']);
    for i in 0..tensors.len() {
        unicode(&mut out, &i.to_string());
    }
    out.extend_from_slice(b"e.");
    for t in tensors {
        out.extend_from_slice(&(t.values.len() as u64).to_le_bytes());
        out.extend(f32_bytes(&t.values));
    }
    out
}

/// The entries of a zip checkpoint: `archive/data.pkl`, `archive/data/<i>`, `archive/version`.
pub fn zip_entries(tensors: &[SeedTensor], nested_under: Option<&str>) -> Vec<(String, Vec<u8>)> {
    let mut entries = vec![("archive/data.pkl".to_string(), state_dict_pickle(tensors, false, nested_under))];
    for (i, t) in tensors.iter().enumerate() {
        entries.push((format!("archive/data/{i}"), f32_bytes(&t.values)));
    }
    entries.push(("archive/version".into(), b"3\n".to_vec()));
    entries
}

/// A zip archive of stored (uncompressed) entries with their CRC-32s.
pub fn zip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let crc = crc.sum();
        let offset = out.len() as u32;
        let common = |v: &mut Vec<u8>| {
            v.extend_from_slice(&20u16.to_le_bytes()); // version needed
            v.extend_from_slice(&0u16.to_le_bytes()); // flags
            v.extend_from_slice(&0u16.to_le_bytes()); // stored
            v.extend_from_slice(&0u32.to_le_bytes()); // time, date
            v.extend_from_slice(&crc.to_le_bytes());
            v.extend_from_slice(&(data.len() as u32).to_le_bytes());
            v.extend_from_slice(&(data.len() as u32).to_le_bytes());
            v.extend_from_slice(&(name.len() as u16).to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes()); // extra
        };
        out.extend_from_slice(b"PK\x03\x04");
        common(&mut out);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(b"PK\x01\x02");
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        common(&mut central);
        central.extend_from_slice(&[0u8; 6]); // comment length, disk, internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let central_at = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06");
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&central_at.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// The seed tensors: a linear layer's weight and bias, and a 4-d conv weight.
pub fn seed_tensors() -> Vec<SeedTensor> {
    vec![
        SeedTensor { name: "head.weight", shape: vec![3, 2], values: vec![0.5, -1.0, 2.0, 0.25, -0.125, 4.0] },
        SeedTensor { name: "head.bias", shape: vec![3], values: vec![0.1, 0.2, 0.3] },
        SeedTensor { name: "patch_embed.proj.weight", shape: vec![2, 1, 2, 2], values: (0..8).map(|i| i as f32 / 8.0).collect() },
    ]
}
