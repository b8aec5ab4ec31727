"""GPT-2 vocabulary facts shared by the model, the data pipeline and the commands."""

GPT2_VOCAB_SIZE = 50257  # ids 0 .. 50256
EOT_ID = 50256  # <|endoftext|>, prepended to every document
UINT16_LIMIT = 1 << 16  # token files store ids as uint16
