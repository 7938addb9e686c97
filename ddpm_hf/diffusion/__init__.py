"""The paper's math, writing no files: the scheduler and its tables, the losses, the bound in bits/dim, the
timestep samplers, the EMA and the UNet presets."""
