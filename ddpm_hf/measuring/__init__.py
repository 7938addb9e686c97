"""What a model is measured by: FID/KID/IS and precision/recall as pure functions of features, the feature networks
and references (`ddpm-metrics`), the bound over a folder (`ddpm-nll`) and the published protocols (`ddpm-evaluate`)."""
