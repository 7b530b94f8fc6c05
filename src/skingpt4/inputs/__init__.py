"""What goes into the model: photos read safely (`images`), their pixels (`pixels`), the chat (`conversation`) and
its token ids with image slots (`prompt`)."""
