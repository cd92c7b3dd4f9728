# TEMPORARY stand-in until the helper's module lands
class NgramProposer:
    def __init__(self, min_n, max_n, k):
        self.min_n, self.max_n, self.k = min_n, max_n, k

    def propose(self, token_ids, max_tokens):
        L = len(token_ids)
        for n in range(self.max_n, self.min_n - 1, -1):
            if n >= L:
                continue
            suffix = token_ids[L - n:]
            for i in range(0, L - n):
                if token_ids[i:i + n] == suffix:
                    return list(token_ids[i + n:i + n + min(self.k, max_tokens)])
        return []
