"""From prompt text to the U-Net's conditioning: A1111's dialect, the tokenizer, textual inversion."""
