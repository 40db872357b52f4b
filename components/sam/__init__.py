"""Segment Anything building blocks shared by fine-tuning and evaluation.

model: build_sam, set_trainable, export_state_dict, decode (prompts in original pixels -> low-res
logits, masks at original size, predicted IoU) / decode_input_frame, use_fast_decoder.
transforms: SAM's resize-longest-side / normalise / pad and the way back (Frame).
prompt_batch: every prompt of an iteration (boxes, points, clicks) in one decoder call, and which of
SAM's four outputs each prompt is scored on (shared by training and evaluation).
prompts: boxes, points, corrective clicks. losses: Dice + IoU-MSE. metrics: per-instance Dice/IoU.
embeddings: the frozen encoder's output, cached by (weights sha, image sha).
decoder: MaskDecoder.predict_masks with its arithmetic reorganised for many prompts (same numbers).
"""
