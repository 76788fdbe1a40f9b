"""Pure types shared by every layer (stdlib only): replies, errors, session/transaction model."""
