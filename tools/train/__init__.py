"""Training the compact default model: the corpus reader and split, whole-word masking data,
pretraining (with layer growth), TinyBERT-style distillation, masked-LM loss on identical blanks.
"""
