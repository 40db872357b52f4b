"""Segment Anything building blocks shared by fine-tuning and evaluation.

model: build_sam, set_trainable, export_state_dict.
transforms: SAM's resize-longest-side / normalise / pad and the way back (Frame).
prompt_batch: every prompt of an iteration (boxes, points, clicks) in one decoder call, which of SAM's four
outputs each prompt is taken as, and decode_prompts: the one way training, validation, evaluation and predict
decode.
prompts: boxes, points, corrective clicks. losses: Dice + IoU-MSE. metrics: per-instance Dice/IoU.
embeddings: the frozen encoder's output, cached by (weights sha, image sha).
decoder: MaskDecoder.predict_masks with its arithmetic reorganised for many prompts (same numbers).
"""
