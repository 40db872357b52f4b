"""SAM's MaskDecoder.predict_masks with its arithmetic reorganised for many prompts at once.

Same parameters, same function (tests/test_decoder.py checks outputs and every parameter's gradient
against the official modules), less work per prompt. Where the time went, per prompt and per round, in
a profile of the training step on CPU: the two-way transformer's projections of the 64x64 image tokens
(ten 4096x256x128 products), the mask upscaling (two transposed convolutions, a LayerNorm2d written
as six elementwise passes, two GELUs over 128x128x64 and 256x256x32 activations), and copies.

1. Shared first-layer image projections. The official code gives every prompt its own copy of the
   image tokens before the first layer. Until the first image-to-token attention writes to them they
   are the same for all prompts of an image (unless a mask prompt adds a per-prompt dense embedding),
   so the first layer's key and value projections (token-to-image attention) and its query projection
   (image-to-token attention) are computed once per image: 3 of the 10 large projections per prompt.
2. Each layer's image-side projections in one product (`_project_image`), the positional encoding's
   share folded into the bias: one cast of the image tokens to the autocast dtype per layer, not three.
3. On a GPU, attention through `F.scaled_dot_product_attention`: one fused kernel (and its backward)
   for the official `q @ k^T / sqrt(d)`, softmax, `@ v`, where the step is bound by kernel launches.
   On CPU the explicit products stay: with 7-9 prompt tokens against 4096 image tokens and a head
   dimension of 16, torch's CPU kernel took about 1.5x longer than matmul + softmax (one-thread
   forward + backward of the transformer, 3 prompts, bf16).
4. The upscaling as two matrix products in "unshuffled" pixel order. A transposed convolution with
   kernel 2 and stride 2 is a per-pixel linear map to 2x2 output pixels; LayerNorm2d, GELU and the
   second such convolution are per pixel too, so nothing needs the pixels in image order until the
   hypernetwork's product has reduced 32 channels to 4 masks. Only those 4 channels are put back in
   image order. LayerNorm2d is `F.layer_norm` over channels-last pixels (one fused op; the same
   formula, computed in fp32 under autocast where the official one ran in the autocast dtype).

One round, forward and backward, is 1.3-1.6x faster than the official decoder on CPU (1-8 prompts,
bf16, benchmarks/decoder_speed.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn




def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, L, C) -> (B, heads, L, C / heads), as the official Attention._separate_heads."""
    b, length, c = x.shape
    return x.view(b, length, n_heads, c // n_heads).transpose(1, 2)


def fused_by_default(device: torch.device) -> bool:
    """Which attention kernel `fused=None` means: fused on CUDA, explicit products on CPU (item 3 above)."""
    return device.type == "cuda"


def _attend(m: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool) -> torch.Tensor:
    """The official Attention.forward of module `m` on projected (B, L, C') q, k, v, then out_proj.
    k and v may have batch 1 (one image's projections, shared by all prompts): they broadcast.
    `fused`: F.scaled_dot_product_attention, else matmul + softmax (the same numbers within rounding)."""
    n = max(q.shape[0], k.shape[0])
    q, k, v = (_heads(t, m.num_heads).expand(n, -1, -1, -1) for t in (q, k, v))
    if fused:
        out = F.scaled_dot_product_attention(q, k, v)  # the official scale 1 / sqrt(head dim)
    else:
        out = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1) @ v
    return m.out_proj(out.transpose(1, 2).reshape(n, out.shape[2], -1))


def _project_image(keys: torch.Tensor, key_pe: torch.Tensor, with_pe: tuple[nn.Linear, ...],
                   without_pe: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
    """[p(keys + key_pe) for p in with_pe] + [p(keys) for p in without_pe] as one product over the image
    tokens keys (B, 4096, C). p(keys + pe) = p(keys) + W pe, and W pe is the same for every prompt, so it
    joins the bias as a (1, 4096, C') offset: the official code instead forms keys + pe, an (N, 4096, C)
    sum, twice per layer, and casts each projection's input to the autocast dtype separately."""
    linears = (*with_pe, *without_pe)
    weight = torch.cat([p.weight for p in linears])
    pe_weight = torch.cat([p.weight for p in with_pe] + [torch.zeros_like(p.weight) for p in without_pe])
    offset = F.linear(key_pe, pe_weight, torch.cat([p.bias for p in linears]))
    out = torch.baddbmm(offset, keys, weight.t().expand(keys.shape[0], -1, -1))
    return list(out.split([p.out_features for p in linears], dim=-1))


def _select(x: torch.Tensor, image_index: torch.Tensor | None) -> torch.Tensor:
    """Per-image rows -> per-prompt rows (no copy when there is one image)."""
    return x if image_index is None else x[image_index]


def two_way_transformer(t: nn.Module, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor,
                        image_index: torch.Tensor | None, shared_image: bool, fused: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """TwoWayTransformer.forward: image (B, 4096, C) channels-last tokens, image_pe (1, 4096, C), tokens
    (N, T, C). `shared_image`: `image` is per image (B images, `image_index` (N,) maps prompts to them, or
    None when B == 1) rather than per prompt (B == N). Returns (queries (N, T, C), keys (N, 4096, C))."""
    query_pe, key_pe = tokens, image_pe
    queries, keys = tokens, image
    for i, layer in enumerate(t.layers):
        if layer.skip_first_layer_pe:
            a = layer.self_attn  # the official first layer: no positional encoding, no residual
            queries = _attend(a, a.q_proj(tokens), a.k_proj(tokens), a.v_proj(tokens), fused)
        else:
            a = layer.self_attn
            q = queries + query_pe
            queries = queries + _attend(a, a.q_proj(q), a.k_proj(q), a.v_proj(queries), fused)
        queries = layer.norm1(queries)

        # Both cross attentions project this layer's image tokens: keys and values for the tokens'
        # attention to the image, queries for the image's attention to the tokens. One product.
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        kp, qp, vp = _project_image(keys, key_pe, with_pe=(t2i.k_proj, i2t.q_proj), without_pe=(t2i.v_proj,))
        if i == 0 and shared_image:  # the same for every prompt of an image until the image attends to them
            kp, qp, vp, keys = (_select(x, image_index) for x in (kp, qp, vp, keys))
        queries = layer.norm2(queries + _attend(t2i, t2i.q_proj(queries + query_pe), kp, vp, fused))
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + query_pe
        keys = layer.norm4(keys + _attend(i2t, qp, i2t.k_proj(q), i2t.v_proj(queries), fused))

    a = t.final_attn_token_to_image
    kp, vp = _project_image(keys, key_pe, with_pe=(a.k_proj,), without_pe=(a.v_proj,))
    out = _attend(a, a.q_proj(queries + query_pe), kp, vp, fused)
    return t.norm_final_attn(queries + out), keys


def _transposed_conv_2x2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """ConvTranspose2d(kernel 2, stride 2) on channels-last pixels (..., C_in) -> (..., 2, 2, C_out): output
    pixel (2i + a, 2j + b) of the official layout is [..., i, j, a, b, :] here."""
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)  # columns in (a, b, out) order
    return F.linear(x, weight.t(), conv.bias.repeat(4)).unflatten(-1, (2, 2, c_out))


def upscale_and_predict(d: nn.Module, keys: torch.Tensor, mask_tokens_out: torch.Tensor) -> torch.Tensor:
    """output_upscaling and the hypernetwork product: keys (N, 64 * 64, C) in row-major pixel order,
    mask tokens (N, M, C) -> masks (N, M, 256, 256)."""
    conv1, norm, act1, conv2, act2 = d.output_upscaling
    n, hw, c = keys.shape
    h = w = int(hw ** 0.5)
    x = _transposed_conv_2x2(keys.view(n, h, w, c), conv1)  # (N, h, w, 2, 2, C/4)
    x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
    x = act2(_transposed_conv_2x2(x, conv2))  # (N, h, w, 2, 2, 2, 2, C/8)
    hyper = torch.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(d.output_hypernetworks_mlps)], dim=1)
    masks = x.reshape(n, -1, x.shape[-1]) @ hyper.transpose(1, 2)  # (N, pixels, M): 32 channels -> M masks
    # [N, i, j, a1, b1, a2, b2, M] -> image row 4i + 2a1 + a2, column 4j + 2b1 + b2.
    masks = masks.view(n, h, w, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return masks.reshape(n, -1, 4 * h, 4 * w)


def predict_masks(d: nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                  sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                  image_index: torch.Tensor | None = None, fused: bool | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """MaskDecoder.predict_masks of decoder `d`: all four outputs ((N, 4, 256, 256) logits, (N, 4) IoU).
    `fused`: the attention kernel (None: `fused_by_default` for the embeddings' device).

    image_embeddings (B, C, 64, 64): one image for all N prompts, or B images with `image_index` (N,)
    naming each prompt's image. dense_prompt_embeddings (N, C, 64, 64), or any shape that broadcasts to
    it with batch 1: the prompt encoder's no-mask embedding is such an expanded view (stride 0), and then
    the image tokens are shared by all prompts of an image in the first layer."""
    n = sparse_prompt_embeddings.shape[0]
    b = image_embeddings.shape[0]
    if b > 1 and image_index is None:
        raise ValueError(f"{b} image embeddings need image_index to say which prompt belongs to which")
    output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings), dim=1)
    dense = dense_prompt_embeddings
    shared = dense.shape[0] == 1 or dense.stride(0) == 0
    if shared:
        src = image_embeddings + dense[:1]  # (B, C, 64, 64)
    else:
        src = _select(image_embeddings, image_index) + dense  # (N, C, 64, 64)
    image = src.flatten(2).transpose(1, 2)  # (B or N, 4096, C), channels last as the transformer wants
    pe = image_pe.flatten(2).transpose(1, 2)
    fused = fused_by_default(image.device) if fused is None else fused
    hs, keys = two_way_transformer(d.transformer, image, pe, tokens, image_index, shared, fused)
    masks = upscale_and_predict(d, keys, hs[:, 1:1 + d.num_mask_tokens])
    return masks, d.iou_prediction_head(hs[:, 0])
