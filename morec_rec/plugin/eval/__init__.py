"""Full-ranking evaluation and its metrics: what validation control and alignment read."""
