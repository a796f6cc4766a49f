"""Put a D-CHAG front end (`dchag.FrontEnd` or its channel-parallel form) into a foreign backbone.

Each adapter needs its library, an optional extra: `pip install "dchag[hf]"` for `hf_vit`. None of them
imports that library itself: it works on the model object it is given.
"""
