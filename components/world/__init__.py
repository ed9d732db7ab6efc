"""The shapes world: coloured shapes on a plain background, rendered from a seed."""
