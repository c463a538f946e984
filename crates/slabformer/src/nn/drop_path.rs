//! Stochastic depth: in training, drop a sample's residual branch with probability `rate` and
//! scale the kept ones by 1/(1 − rate).

use burn::module::{Flag, Module, Param};
use burn::tensor::{Distribution, Tensor};

use super::is_training;

#[derive(Module, Debug)]
pub struct DropPath {
    pub rate: f64,
    pub training: Param<Flag>,
}

impl DropPath {
    pub fn new(rate: f64) -> Self {
        Self {
            rate,
            training: Param::from_bool(true),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        if self.rate <= 0.0 || !is_training(&self.training, &x) {
            return x;
        }
        let keep = 1.0 - self.rate;
        let [b, _, _] = x.dims();
        let mask = Tensor::<3>::random([b, 1, 1], Distribution::Bernoulli(keep), &x.device());
        x.mul(mask.div_scalar(keep))
    }
}
