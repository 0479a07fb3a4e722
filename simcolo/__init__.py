"""simcolo: should this GPU fleet co-locate training with inference serving, and how?"""
