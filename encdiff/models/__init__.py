"""The model parts, one file each: vqvae, klvae, poolae (stage 1), encoder, unet, vq_loss, and encdiff
(the two-stage model and its builders from the config)."""
