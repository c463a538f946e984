//! EfficientFormer's attention biases (v1 Meta3D, v2 Attention2d and Attention2dDownsample): a
//! learned table `attention_biases` (heads, N_k) indexed by the absolute offset between a query
//! and a key position, `idx = |y_q − y_k|·W_k + |x_q − x_k|`, added to the scores. The index is an
//! integer buffer (`attention_bias_idxs`: persistent in v1, recomputed in v2); the attention
//! modules hold both under those keys, these are the shared rules.

use burn::module::Param;
use burn::tensor::{Int, Tensor};

/// The (N_q, N_k) index, row-major, of queries on every `step`-th point of a `keys` grid (v2's
/// stride-2 downsampling attention reads the even points; the other attentions step 1) against
/// every key position of that grid.
pub fn bias_index(keys: [usize; 2], step: usize) -> (Vec<i64>, [usize; 2]) {
    let [h, w] = keys;
    let queries: Vec<(usize, usize)> = (0..h).step_by(step).flat_map(|y| (0..w).step_by(step).map(move |x| (y, x))).collect();
    let index = queries
        .iter()
        .flat_map(|&(yq, xq)| (0..h * w).map(move |k| (yq.abs_diff(k / w) * w + xq.abs_diff(k % w)) as i64))
        .collect();
    (index, [queries.len(), h * w])
}

/// The (heads, N_q, N_k) bias of `biases` (heads, N_k) at the (N_q, N_k) `index`.
pub fn gather_bias(biases: &Param<Tensor<2>>, index: Tensor<2, Int>) -> Tensor<3> {
    let [heads, _] = biases.dims();
    let [nq, nk] = index.dims();
    biases.val().select(1, index.reshape([nq * nk])).reshape([heads, nq, nk])
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn the_index_is_the_absolute_offset_and_the_gather_reads_it() {
        // SPEC §7.3 item 24: the 7×7 index is symmetric, zero on the diagonal, in [0, 48].
        let (index, shape) = bias_index([7, 7], 1);
        assert_eq!(shape, [49, 49]);
        assert!((0..49).all(|i| index[i * 49 + i] == 0 && (0..49).all(|j| index[i * 49 + j] == index[j * 49 + i])));
        assert_eq!(index.iter().max(), Some(&48));
        assert_eq!(index[48], 48); // (0, 0) against (6, 6)
        assert_eq!(index[10], 10); // (0, 0) against (1, 3): 1·7 + 3
        // v2's downsampling query grid: the even points of 4×4 against all 16 keys.
        let (index, shape) = bias_index([4, 4], 2);
        assert_eq!(shape, [4, 16]);
        assert_eq!(&index[16..20], &[2, 1, 0, 1]); // query (0, 2) against keys (0, 0..4)
        assert_eq!(index[3 * 16 + 5], 5); // query (2, 2) against key (1, 1)

        let device = Device::flex();
        let biases = Param::from_tensor(Tensor::<2>::from_floats([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]], &device));
        let (index, [nq, nk]) = bias_index([2, 2], 1);
        let got = gather_bias(&biases, Tensor::from_data(TensorData::new(index.clone(), [nq, nk]), &device));
        let want: Vec<f32> = [0.0, 10.0].iter().flat_map(|base| index.iter().map(move |&i| base + i as f32)).collect();
        assert_eq!(crate::state::host_f32(got), want);
    }
}
