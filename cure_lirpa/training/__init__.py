"""Training: the one training loop (``trainer``, shared with smoothing training), certified
training's task (``certified``) and configuration (``config``), objectives (IBP, SABR, MTL-IBP,
CURE-Joint/Max/Random), their losses, schedules, one optimizer step, metrics and step timing."""
