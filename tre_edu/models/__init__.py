"""Models: the tiny CPU model (:mod:`.tiny`), pretrained hub models (:mod:`.hub`) and SmolLM2-135M-Instruct
offline (:mod:`.smollm2`)."""
