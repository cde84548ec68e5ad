"""Edge-cloud logit fusion across tokenizers: vocabulary alignment, fusion rules, and the co-decoding loop."""
