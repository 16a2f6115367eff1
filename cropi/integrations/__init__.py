"""cropi inside other trainers: reward functions and curriculum samplers for verl and TRL."""
