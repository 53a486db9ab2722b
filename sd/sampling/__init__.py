"""Noise schedules and the samplers that walk them."""
