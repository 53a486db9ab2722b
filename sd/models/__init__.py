"""The networks of SD 1.5: CLIP's text encoder, the VAE's encoder and decoder, the U-Net, and their layers."""
