"""Drawing images: the sampler choice and one seed per image, `ddpm-sample`'s folder, and the paper's figures."""
