"""Feature backbones: the diffusion model (VAE + UNet taps), the weights-free handcrafted demo backbone, conditioning, offline checkpoint resolution."""
