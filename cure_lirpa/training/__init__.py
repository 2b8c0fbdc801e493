"""Certified training: objectives (IBP, SABR, MTL-IBP, CURE-Joint/Max/Random), their losses,
schedules, one training step, and the trainer."""
