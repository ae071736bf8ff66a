"""The `aten` module format: which PyTorch operators a session may name, and how a call
is spelled (no torch import here: the client and the server both read it).

An `aten` function is one operator call with its non-tensor arguments fixed: its
name is JSON, `[overload, n_out, args, kwargs]`, for example
`["add.Tensor", 1, [{"t": 1}, {"t": 2}], {"alpha": {"s": 3}}]`. Placeholders name
the launch's arguments by index: `{"t": i}` a tensor (an `ArrayArg`), `{"s": i}`
a number (a `Scalar`), `{"c": i}` a number that the operator takes as a 0-dim CPU
tensor; `{"dt": "float32"}` is a dtype, `{"mf": ...}` a memory format,
`{"ly": "strided"}` the layout and `{"dv": 0}` the session's device; a random
operator's generator is null, meaning the session's own. The first `n_out` launch arguments are the
arrays the results are written to; an in-place or `out=` operator has none
(its result is an argument). The server runs only operators in `OPERATORS`, by
torch, on the arrays the launch names: a tenant sends names and numbers, never
code.
"""
from __future__ import annotations

#: Operator packets (`aten::NAME`, any overload) a session may run. Pure tensor
#: computations only: nothing that reads files, prints, resizes storage in place or
#: reaches outside the arrays it is given.
OPERATORS = frozenset("""
abs abs_ neg neg_ sign sgn exp exp_ exp2 expm1 log log_ log2 log10 log1p sqrt sqrt_ rsqrt
rsqrt_ sin cos tan tanh tanh_ sinh cosh asin acos atan atan2 sigmoid sigmoid_ erf erfc
erfinv floor ceil round trunc frac reciprocal reciprocal_ square pow pow_ clamp clamp_
clamp_min clamp_min_ clamp_max clamp_max_ clip clip_ lerp lerp_ hypot logit nan_to_num
add add_ sub sub_ rsub mul mul_ div div_ remainder fmod true_divide floor_divide
addcmul addcmul_ addcdiv addcdiv_ maximum minimum fmax fmin
eq ne lt le gt ge eq_ ne_ lt_ le_ gt_ ge_ logical_and logical_or logical_not logical_xor
bitwise_and bitwise_or bitwise_xor bitwise_not isnan isinf isfinite where masked_fill
masked_fill_ masked_select
sum mean prod amax amin max min argmax argmin var std var_mean std_mean norm
linalg_vector_norm all any cumsum cumprod logsumexp sort topk
mm bmm addmm addbmm baddbmm matmul dot mv addmv outer linear
copy_ clone _to_copy contiguous fill_ zero_ ones_like zeros_like full_like fill
arange linspace eye full scalar_tensor tril triu tril_ triu_ one_hot
index_select gather scatter scatter_ scatter_add scatter_add_ scatter_reduce index
index_put index_put_ index_add index_add_ index_copy take embedding embedding_dense_backward
cat stack flip roll repeat constant_pad_nd
relu relu_ gelu gelu_backward silu silu_backward leaky_relu leaky_relu_backward elu
elu_backward hardtanh hardtanh_ hardtanh_backward softplus threshold threshold_backward
sigmoid_backward tanh_backward _softmax _log_softmax _softmax_backward_data
_log_softmax_backward_data
nll_loss_forward nll_loss_backward nll_loss2d_forward nll_loss2d_backward mse_loss
mse_loss_backward binary_cross_entropy binary_cross_entropy_backward smooth_l1_loss
smooth_l1_loss_backward
native_layer_norm native_layer_norm_backward native_batch_norm native_batch_norm_backward
_native_batch_norm_legit _native_batch_norm_legit_functional _native_batch_norm_legit_no_training
convolution convolution_backward max_pool2d_with_indices max_pool2d_with_indices_backward
avg_pool2d avg_pool2d_backward _adaptive_avg_pool2d _adaptive_avg_pool2d_backward
native_dropout native_dropout_backward bernoulli bernoulli_ normal_ uniform_ random_
exponential_ randperm
_foreach_add _foreach_add_ _foreach_sub _foreach_sub_ _foreach_mul _foreach_mul_
_foreach_div _foreach_div_ _foreach_addcmul_ _foreach_addcdiv_ _foreach_lerp_
_foreach_sqrt _foreach_sqrt_ _foreach_neg _foreach_maximum_ _foreach_zero_ _foreach_copy_
""".split())

#: Operators that draw random numbers: the server runs them on the session's generator.
RANDOM = frozenset("native_dropout bernoulli bernoulli_ normal_ uniform_ random_ exponential_ "
                   "randperm".split())

#: Dtypes an `aten` array may have (NumPy's names; torch's of the same width).
DTYPES = frozenset("bool uint8 int8 int16 int32 int64 float16 float32 float64 complex64 "
                   "complex128".split())

MEMORY_FORMATS = frozenset("contiguous_format preserve_format channels_last".split())

#: The pseudo-operator that seeds the session's generator: `["!seed", 0, [{"s": 0}], {}]`.
SEED = "!seed"

#: Template nesting and size bounds (a name is at most `wire.MAX_NAME` characters anyway).
MAX_DEPTH = 4
MAX_STRING = 32


def packet_of(overload: str) -> str:
    """`"add.Tensor"` -> `"add"`."""
    return overload.split(".", 1)[0]


def display_name(name: str) -> str:
    """A kernel name as people read it: `aten::add.Tensor` for an `aten` call, else itself."""
    if name.startswith('["'):
        import json
        try:
            spec = json.loads(name)
        except ValueError:
            return name
        if type(spec) is list and spec and type(spec[0]) is str:
            return "aten::" + spec[0]
    return name
