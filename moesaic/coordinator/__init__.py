"""The coordinator: expert registry, gate, MoE² selection, fusion and the Perceive service."""
