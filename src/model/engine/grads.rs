//! Gradient buffers of the trained variables, filled in place by the backward.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, TensorId, Var};

use crate::model::fused;

/// One buffer per trained variable, allocated at its first gradient and kept (zeroed,
/// not freed) across micro-batches and steps. A weight used twice (a tied head) has
/// one buffer.
pub struct Grads {
    index: HashMap<TensorId, usize>,
    shapes: Vec<(Vec<usize>, DType)>,
    bufs: Vec<Option<Tensor>>,
    /// Whether each buffer holds this step's gradient (else it is stale and is
    /// overwritten, not added to).
    live: Vec<bool>,
    /// The tensor each buffer is bound to by [`Grads::bind`], if any.
    bound: Vec<Option<TensorId>>,
}

impl Grads {
    /// Buffers for `vars` (in their order, which [`Grads::take`] returns).
    pub fn new(vars: &[(String, Var)]) -> Self {
        let index = vars
            .iter()
            .enumerate()
            .map(|(i, (_, v))| (v.as_tensor().id(), i))
            .collect();
        Grads {
            index,
            shapes: vars
                .iter()
                .map(|(_, v)| (v.dims().to_vec(), v.dtype()))
                .collect(),
            bufs: vec![None; vars.len()],
            live: vec![false; vars.len()],
            bound: vec![None; vars.len()],
        }
    }

    /// Buffers for trained parameters of these shapes and dtypes, bound to no tensor
    /// yet: [`Grads::bind`] says which tensor each one is, and may say it again for a
    /// fresh copy (`--strategy fsdp` gathers a block's parameters anew for each pass).
    pub fn unbound(slots: Vec<(Vec<usize>, DType)>) -> Self {
        let n = slots.len();
        Grads {
            index: HashMap::new(),
            shapes: slots,
            bufs: vec![None; n],
            live: vec![false; n],
            bound: vec![None; n],
        }
    }

    /// From now on `t` is the parameter of buffer `i` (and no other tensor is).
    pub fn bind(&mut self, i: usize, t: &Tensor) -> Result<()> {
        let Some((dims, _)) = self.shapes.get(i) else {
            candle_core::bail!("gradient buffer {i} of {} (a bug)", self.shapes.len());
        };
        if t.dims() != dims.as_slice() {
            candle_core::bail!(
                "gradient buffer {i} is {dims:?}, its parameter {:?} (a bug)",
                t.dims()
            );
        }
        if let Some(old) = self.bound[i].replace(t.id()) {
            self.index.remove(&old);
        }
        self.index.insert(t.id(), i);
        Ok(())
    }

    /// Buffer `i`'s gradient of this step (zeros where none flowed), its memory handed
    /// over: the next gradient allocates a fresh buffer.
    pub fn take_freed(&mut self, i: usize, device: &candle_core::Device) -> Result<Tensor> {
        let (dims, dtype) = &self.shapes[i];
        let g = match (self.bufs[i].take(), self.live[i]) {
            (Some(b), true) => b,
            _ => Tensor::zeros(dims.as_slice(), *dtype, device)?,
        };
        self.live[i] = false;
        Ok(g)
    }

    /// The buffers of the trained ones among `params` (made live, zeros where no
    /// gradient flowed yet) handed to `f`, which may replace them (by tensors of the
    /// same shapes: a sum over ranks, say); returns their indices.
    pub fn replace_buffers(
        &mut self,
        params: &[Tensor],
        f: impl FnOnce(&mut [Tensor]) -> Result<()>,
    ) -> Result<Vec<usize>> {
        let mut slots = Vec::new();
        let mut bufs = Vec::new();
        for p in params {
            if let Some(&i) = self.index.get(&p.id())
                && !slots.contains(&i)
                && let Some(b) = self.buffer(p, p)?
            {
                slots.push(i);
                bufs.push(b);
            }
        }
        f(&mut bufs)?;
        for (&i, b) in slots.iter().zip(bufs) {
            if b.dims() != self.shapes[i].0.as_slice() {
                candle_core::bail!(
                    "gradient buffer {i} replaced by a tensor of another shape (a bug)"
                );
            }
            self.bufs[i] = Some(b);
        }
        Ok(slots)
    }

    /// Whether `t` (a parameter of the model) is trained.
    pub fn wants(&self, t: &Tensor) -> bool {
        self.index.contains_key(&t.id())
    }

    /// The buffer of `param`, this step's values kept (or zeroed when stale), or None
    /// when `param` is not trained.
    fn buffer(&mut self, param: &Tensor, like: &Tensor) -> Result<Option<Tensor>> {
        let Some(&i) = self.index.get(&param.id()) else {
            return Ok(None);
        };
        let (dims, dtype) = &self.shapes[i];
        // In-place buffers are f32 on the device of the gradient.
        let usable = |b: &Tensor| b.device().same_device(like.device());
        if self.bufs[i].as_ref().is_none_or(|b| !usable(b)) {
            self.bufs[i] = Some(Tensor::zeros(dims.as_slice(), *dtype, like.device())?);
            self.live[i] = true;
        }
        let buf = self.bufs[i].clone().expect("set above");
        if !self.live[i] {
            buf.zero_set()?;
            self.live[i] = true;
        }
        Ok(Some(buf))
    }

    /// `grad(param) += g` (`g` of `param`'s shape, any dtype).
    pub fn add(&mut self, param: &Tensor, g: &Tensor) -> Result<()> {
        let Some(buf) = self.buffer(param, g)? else {
            return Ok(());
        };
        let g = g.to_dtype(buf.dtype())?.contiguous()?;
        let done =
            super::profile::timed("gradient accumulation", 0.0, || fused::add_assign(&buf, &g))?;
        if !done {
            let sum = (&buf + g.reshape(buf.shape())?)?;
            self.replace(param, sum);
        }
        Ok(())
    }

    /// `grad(param) += alpha · op(a) · op(b)`, through gemm into the buffer on CPU f32.
    pub fn add_matmul(
        &mut self,
        kind: &'static str,
        param: &Tensor,
        (a, a_t): (&Tensor, bool),
        (b, b_t): (&Tensor, bool),
        alpha: f64,
    ) -> Result<()> {
        let Some(buf) = self.buffer(param, a)? else {
            return Ok(());
        };
        let (m, n) = buf.dims2()?;
        let k = a.elem_count() / m.max(1);
        let flops = 2.0 * (m * n * k) as f64;
        let done = super::profile::timed(kind, flops, || {
            Ok::<_, candle_core::Error>(
                buf.dtype() == a.dtype() && fused::gemm_acc(&buf, a, a_t, b, b_t, alpha as f32)?,
            )
        })?;
        if done {
            return Ok(());
        }
        let opa = if a_t { a.t()? } else { a.clone() };
        let opb = if b_t { b.t()? } else { b.clone() };
        let mut p = opa.matmul(&opb)?;
        if alpha != 1.0 {
            p = (p * alpha)?;
        }
        self.add(param, &p)
    }

    /// `grad(param)[ids[i]] += g[i]` (embedding rows).
    pub fn add_rows(&mut self, param: &Tensor, ids: &Tensor, g: &Tensor) -> Result<()> {
        let Some(buf) = self.buffer(param, g)? else {
            return Ok(());
        };
        let g = g.to_dtype(buf.dtype())?.contiguous()?;
        let id_vec = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let done = super::profile::timed("embedding", 0.0, || fused::rows_add(&buf, &id_vec, &g))?;
        if !done {
            let sum = buf.index_add(ids, &g, 0)?;
            self.replace(param, sum);
        }
        Ok(())
    }

    fn replace(&mut self, param: &Tensor, t: Tensor) {
        if let Some(&i) = self.index.get(&param.id()) {
            self.bufs[i] = Some(t);
        }
    }

    /// Add this step's gradients in `other` (buffers of the same variables) into
    /// these, and mark `other`'s stale.
    pub fn absorb(&mut self, other: &mut Grads) -> Result<()> {
        if other.bufs.len() != self.bufs.len() {
            candle_core::bail!("gradient buffers of different variables (a bug)");
        }
        for i in 0..self.bufs.len() {
            let g = match (&other.bufs[i], other.live[i]) {
                (Some(g), true) => g.clone(),
                _ => continue,
            };
            other.live[i] = false;
            match (&self.bufs[i], self.live[i]) {
                (Some(b), true) => {
                    if !super::profile::timed("gradient accumulation", 0.0, || {
                        fused::add_assign(b, &g)
                    })? {
                        self.bufs[i] = Some((b + &g)?);
                    }
                }
                _ => {
                    self.bufs[i] = Some(g.copy()?);
                    self.live[i] = true;
                }
            }
        }
        Ok(())
    }

    /// This step's gradients in the variables' order and dtypes (zeros where none
    /// flowed). The buffers are kept, and zeroed at the next step's first gradient: the
    /// caller must be done with these tensors by then.
    pub fn take(&mut self, vars: &[(String, Var)]) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(vars.len());
        for (i, (_, v)) in vars.iter().enumerate() {
            let g = match (&self.bufs[i], self.live[i]) {
                (Some(b), true) => b.clone(),
                _ => v.as_tensor().zeros_like()?,
            };
            out.push(g.to_dtype(v.dtype())?);
            self.live[i] = false;
        }
        Ok(out)
    }
}
