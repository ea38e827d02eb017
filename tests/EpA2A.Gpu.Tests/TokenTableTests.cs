using EpA2A.Numerics;

namespace EpA2A.Tests;

/// <summary>A tabulated element function gives the same bits as calling it.</summary>
public sealed class TokenTableTests
{
    [Fact]
    public void A_bf16_table_equals_the_function_on_every_input() => EveryInput<BFloat16>();

    [Fact]
    public void A_fp16_table_equals_the_function_on_every_input() => EveryInput<Half>();

    [Fact]
    public void There_is_no_table_for_fp32() =>
        Assert.Throws<NotSupportedException>(() => new TokenTable<float>(x => x));

    private static void EveryInput<T>()
        where T : unmanaged
    {
        static float F(float x) => (x * 1.375f) - 0.1875f;
        TokenTable<T> table = new(F);
        for (int bits = 0; bits < 1 << 16; bits++)
        {
            ushort b = (ushort)bits;
            T x = System.Runtime.CompilerServices.Unsafe.As<ushort, T>(ref b);
            T direct = TokenConvert.FromSingle<T>(F(TokenConvert.ToSingle(x)));
            T tabled = table.Apply(x);
            bool same = EqualityComparer<T>.Default.Equals(direct, tabled) || (float.IsNaN(TokenConvert.ToSingle(direct)) && float.IsNaN(TokenConvert.ToSingle(tabled)));
            if (!same)
            {
                Assert.Fail($"input bits 0x{bits:x4}: table {tabled}, direct {direct}");
            }
        }
    }
}
