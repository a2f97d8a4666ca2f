"""The frozen Kolors stack (loading, the tiny stand-in, ChatGLM wrappers) and the trainable GILL
adapter (visual prefix, [IMG] tokens, mapper, spatial adapter); ``model(batch, mode)`` and the
three modes' losses."""
