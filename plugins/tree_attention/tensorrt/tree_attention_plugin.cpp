// TensorRT plugin of speccompile::TreeAttention (IPluginV3, TensorRT >= 10.0).
//
// The ONNX parser meets the graph's `TreeAttention` node (domain "speccompile"), finds no importer for it and
// looks the op type up in the plugin registry: name "TreeAttention", version "1", namespace "" (the parser's
// defaults, so the node needs no TensorRT-only attributes). Its attributes arrive as plugin fields of the same
// names. The library is a "plugin shared library": TensorRT calls getCreators() when it is loaded with
// IPluginRegistry::loadLibrary (Python: tensorrt.get_plugin_registry().load_library) or trtexec --dynamicPlugins.
//
// Inputs, outputs and attributes are the op's signature in ../README.md. Untested until run in TensorRT on a GPU
// (its kernels have run on one: kernel_check.cu).
#include "tree_attention_kernels.h"

#include "NvInferRuntime.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

constexpr char const* kPLUGIN_NAME = "TreeAttention";
constexpr char const* kPLUGIN_VERSION = "1";
constexpr char const* kPLUGIN_NAMESPACE = "";

enum Input : int32_t
{
    kQKV = 0,
    kPAST_KEY,
    kPAST_VALUE,
    kSEQLENS_K,
    kCOS,
    kSIN,
    kPOSITION_IDS,
    kATTENTION_BIAS,
    kNB_INPUTS
};

enum Output : int32_t
{
    kY = 0,
    kPRESENT_KEY,
    kPRESENT_VALUE,
    kNB_OUTPUTS
};

ILoggerFinder* gLoggerFinder{nullptr};

void logError(std::string const& msg) noexcept
{
    std::string const line = std::string("speccompile TreeAttention plugin: ") + msg;
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(ILogger::Severity::kERROR, line.c_str());
    }
    else
    {
        std::fprintf(stderr, "%s\n", line.c_str());
    }
}

struct Attributes
{
    int32_t numHeads{0};
    int32_t kvNumHeads{0};
    int32_t headDim{0};
    int32_t rotaryInterleaved{0};
    float scale{0.F}; // 0: 1/sqrt(head_dim), as GroupQueryAttention defaults it

    // Empty when valid, else what is wrong.
    std::string error() const
    {
        if (numHeads <= 0 || kvNumHeads <= 0 || numHeads % kvNumHeads != 0)
        {
            return "num_heads must be a positive multiple of kv_num_heads (got " + std::to_string(numHeads) + " and "
                + std::to_string(kvNumHeads) + ")";
        }
        if (headDim <= 0 || headDim % 2 != 0 || headDim > speccompile::kMaxHeadDim)
        {
            return "head_dim must be even and at most " + std::to_string(speccompile::kMaxHeadDim) + " (got "
                + std::to_string(headDim) + ")";
        }
        if (rotaryInterleaved != 0)
        {
            return "only rotary_interleaved=0 (half-split rotary, as Llama) is implemented";
        }
        return {};
    }

    float softmaxScale() const
    {
        return scale != 0.F ? scale : 1.F / std::sqrt(static_cast<float>(headDim));
    }
};

// Shape errors, checked at build time (dims of -1 are dynamic and pass) and again on each shape change.
std::string shapeError(Dims const* in, Attributes const& a)
{
    auto known = [](int64_t d) { return d >= 0; };
    auto differ = [&](int64_t d, int64_t want) { return known(d) && d != want; };
    Dims const& qkv = in[kQKV];
    if (qkv.nbDims != 3 || differ(qkv.d[0], 1)
        || differ(qkv.d[2], static_cast<int64_t>(a.numHeads + 2 * a.kvNumHeads) * a.headDim))
    {
        return "qkv must be [1, S, (num_heads + 2 kv_num_heads) head_dim]";
    }
    for (int32_t c : {kPAST_KEY, kPAST_VALUE})
    {
        Dims const& cache = in[c];
        if (cache.nbDims != 4 || differ(cache.d[0], 1) || differ(cache.d[1], a.kvNumHeads)
            || differ(cache.d[3], a.headDim))
        {
            return "past_key and past_value must be [1, kv_num_heads, LMAX, head_dim]";
        }
    }
    if (in[kSEQLENS_K].nbDims != 1 || differ(in[kSEQLENS_K].d[0], 1))
    {
        return "seqlens_k must be [1]";
    }
    for (int32_t t : {kCOS, kSIN})
    {
        if (in[t].nbDims != 2 || differ(in[t].d[1], a.headDim / 2))
        {
            return "cos_cache and sin_cache must be [positions, head_dim / 2]";
        }
    }
    Dims const& pos = in[kPOSITION_IDS];
    if (pos.nbDims != 2 || differ(pos.d[0], 1) || (known(qkv.d[1]) && differ(pos.d[1], qkv.d[1])))
    {
        return "position_ids must be [1, S]";
    }
    Dims const& bias = in[kATTENTION_BIAS];
    if (bias.nbDims != 4 || differ(bias.d[0], 1) || differ(bias.d[1], 1)
        || (known(qkv.d[1]) && differ(bias.d[2], qkv.d[1]))
        || (known(in[kPAST_KEY].d[2]) && differ(bias.d[3], in[kPAST_KEY].d[2])))
    {
        return "attention_bias must be [1, 1, S, LMAX]";
    }
    return {};
}

class TreeAttentionPlugin : public IPluginV3,
                            public IPluginV3OneCore,
                            public IPluginV3OneBuild,
                            public IPluginV3OneRuntime
{
public:
    explicit TreeAttentionPlugin(Attributes const& attributes)
        : mAttributes(attributes)
    {
        initFields();
    }

    // The serialized fields point into the object that owns them, so a copy must point into itself.
    TreeAttentionPlugin(TreeAttentionPlugin const& other)
        : mAttributes(other.mAttributes)
    {
        initFields();
    }

    TreeAttentionPlugin& operator=(TreeAttentionPlugin const&) = delete;

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        }
        return nullptr;
    }

    IPluginV3* clone() noexcept override
    {
        try
        {
            return new TreeAttentionPlugin(*this);
        }
        catch (std::exception const& e)
        {
            logError(e.what());
        }
        return nullptr;
    }

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override
    {
        return kPLUGIN_NAME;
    }

    char const* getPluginVersion() const noexcept override
    {
        return kPLUGIN_VERSION;
    }

    char const* getPluginNamespace() const noexcept override
    {
        return kPLUGIN_NAMESPACE;
    }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override
    {
        return kNB_OUTPUTS;
    }

    int32_t getOutputDataTypes(
        DataType* outputTypes, int32_t nbOutputs, DataType const* /*inputTypes*/,
        int32_t /*nbInputs*/) const noexcept override
    {
        for (int32_t o = 0; o < nbOutputs; ++o)
        {
            outputTypes[o] = DataType::kFLOAT;
        }
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
        int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || inputs[kQKV].nbDims != 3)
        {
            logError("expected 8 inputs, 3 outputs and a 3-d qkv");
            return -1;
        }
        outputs[kY].nbDims = 3; // [1, S, num_heads * head_dim]
        outputs[kY].d[0] = inputs[kQKV].d[0];
        outputs[kY].d[1] = inputs[kQKV].d[1];
        outputs[kY].d[2] = exprBuilder.constant(static_cast<int64_t>(mAttributes.numHeads) * mAttributes.headDim);
        outputs[kPRESENT_KEY] = inputs[kPAST_KEY]; // the caches keep their shape
        outputs[kPRESENT_VALUE] = inputs[kPAST_VALUE];
        return 0;
    }

    bool supportsFormatCombination(
        int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t /*nbInputs*/,
        int32_t /*nbOutputs*/) noexcept override
    {
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        switch (pos)
        {
        case kSEQLENS_K: return desc.type == DataType::kINT32;
        // int64 as the graph has it; int32 too, in case a TensorRT version narrows it
        case kPOSITION_IDS: return desc.type == DataType::kINT64 || desc.type == DataType::kINT32;
        default: return desc.type == DataType::kFLOAT; // fp32 only: the cache, qkv, tables, bias and outputs
        }
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* /*out*/,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
        {
            logError("expected 8 inputs and 3 outputs");
            return -1;
        }
        Dims dims[kNB_INPUTS];
        for (int32_t i = 0; i < kNB_INPUTS; ++i)
        {
            dims[i] = in[i].desc.dims;
        }
        std::string const error = shapeError(dims, mAttributes);
        if (!error.empty())
        {
            logError(error);
            return -1;
        }
        return 0;
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* /*inputs*/, int32_t /*nbInputs*/,
        DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept override
    {
        return 0;
    }

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS)
        {
            return -1;
        }
        Dims dims[kNB_INPUTS];
        for (int32_t i = 0; i < kNB_INPUTS; ++i)
        {
            dims[i] = in[i].dims;
        }
        std::string const error = shapeError(dims, mAttributes);
        if (!error.empty())
        {
            logError(error);
            return -1;
        }
        return 0;
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
        void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept override
    {
        speccompile::TreeAttentionParams p{};
        p.qkv = static_cast<float const*>(inputs[kQKV]);
        p.pastKey = static_cast<float const*>(inputs[kPAST_KEY]);
        p.pastValue = static_cast<float const*>(inputs[kPAST_VALUE]);
        p.seqlensK = static_cast<int32_t const*>(inputs[kSEQLENS_K]);
        p.cosTable = static_cast<float const*>(inputs[kCOS]);
        p.sinTable = static_cast<float const*>(inputs[kSIN]);
        p.positionIds = inputs[kPOSITION_IDS];
        p.positionIdsInt64 = inputDesc[kPOSITION_IDS].type == DataType::kINT64;
        p.bias = static_cast<float const*>(inputs[kATTENTION_BIAS]);
        p.y = static_cast<float*>(outputs[kY]);
        p.presentKey = static_cast<float*>(outputs[kPRESENT_KEY]);
        p.presentValue = static_cast<float*>(outputs[kPRESENT_VALUE]);
        p.S = static_cast<int32_t>(inputDesc[kQKV].dims.d[1]);
        p.numHeads = mAttributes.numHeads;
        p.kvNumHeads = mAttributes.kvNumHeads;
        p.headDim = mAttributes.headDim;
        p.maxSeqLen = static_cast<int32_t>(inputDesc[kPAST_KEY].dims.d[2]);
        p.ropeRows = static_cast<int32_t>(inputDesc[kCOS].dims.d[0]);
        p.scale = mAttributes.softmaxScale();
        cudaError_t const e = speccompile::launchTreeAttention(p, stream);
        if (e != cudaSuccess)
        {
            logError(std::string("CUDA error: ") + cudaGetErrorString(e));
            return -1;
        }
        return 0;
    }

    IPluginV3* attachToContext(IPluginResourceContext* /*context*/) noexcept override
    {
        return clone(); // no per-context resources
    }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return &mFieldCollection;
    }

private:
    void initFields()
    {
        mFields = {PluginField("num_heads", &mAttributes.numHeads, PluginFieldType::kINT32, 1),
            PluginField("kv_num_heads", &mAttributes.kvNumHeads, PluginFieldType::kINT32, 1),
            PluginField("head_dim", &mAttributes.headDim, PluginFieldType::kINT32, 1),
            PluginField("rotary_interleaved", &mAttributes.rotaryInterleaved, PluginFieldType::kINT32, 1),
            PluginField("scale", &mAttributes.scale, PluginFieldType::kFLOAT32, 1)};
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
    }

    Attributes mAttributes;
    std::vector<PluginField> mFields;
    PluginFieldCollection mFieldCollection{};
};

// Integer and float fields in whichever width the caller used (the ONNX parser passes int32 and float32).
bool readInt(PluginField const& f, int32_t& out)
{
    if (f.data == nullptr || f.length < 1)
    {
        return false;
    }
    switch (f.type)
    {
    case PluginFieldType::kINT32: out = *static_cast<int32_t const*>(f.data); return true;
    case PluginFieldType::kINT64: out = static_cast<int32_t>(*static_cast<int64_t const*>(f.data)); return true;
    default: return false;
    }
}

bool readFloat(PluginField const& f, float& out)
{
    if (f.data == nullptr || f.length < 1)
    {
        return false;
    }
    switch (f.type)
    {
    case PluginFieldType::kFLOAT32: out = *static_cast<float const*>(f.data); return true;
    case PluginFieldType::kFLOAT64: out = static_cast<float>(*static_cast<double const*>(f.data)); return true;
    default: return false;
    }
}

class TreeAttentionPluginCreator : public IPluginCreatorV3One
{
public:
    TreeAttentionPluginCreator()
    {
        mFields = {PluginField("num_heads", nullptr, PluginFieldType::kINT32, 1),
            PluginField("kv_num_heads", nullptr, PluginFieldType::kINT32, 1),
            PluginField("head_dim", nullptr, PluginFieldType::kINT32, 1),
            PluginField("rotary_interleaved", nullptr, PluginFieldType::kINT32, 1),
            PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1)};
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
    }

    char const* getPluginName() const noexcept override
    {
        return kPLUGIN_NAME;
    }

    char const* getPluginVersion() const noexcept override
    {
        return kPLUGIN_VERSION;
    }

    char const* getPluginNamespace() const noexcept override
    {
        return kPLUGIN_NAMESPACE;
    }

    PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mFieldCollection;
    }

    // The same fields at build time (from the ONNX node) and at runtime (from getFieldsToSerialize).
    IPluginV3* createPlugin(
        char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept override
    {
        try
        {
            Attributes a;
            for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
            {
                PluginField const& f = fc->fields[i];
                bool ok = true;
                if (std::strcmp(f.name, "num_heads") == 0)
                {
                    ok = readInt(f, a.numHeads);
                }
                else if (std::strcmp(f.name, "kv_num_heads") == 0)
                {
                    ok = readInt(f, a.kvNumHeads);
                }
                else if (std::strcmp(f.name, "head_dim") == 0)
                {
                    ok = readInt(f, a.headDim);
                }
                else if (std::strcmp(f.name, "rotary_interleaved") == 0)
                {
                    ok = readInt(f, a.rotaryInterleaved);
                }
                else if (std::strcmp(f.name, "scale") == 0)
                {
                    ok = readFloat(f, a.scale);
                }
                if (!ok)
                {
                    logError(std::string("attribute ") + f.name + " has an unexpected type");
                    return nullptr;
                }
            }
            std::string const error = a.error();
            if (!error.empty())
            {
                logError(error);
                return nullptr;
            }
            return new TreeAttentionPlugin(a);
        }
        catch (std::exception const& e)
        {
            logError(e.what());
        }
        return nullptr;
    }

private:
    std::vector<PluginField> mFields;
    PluginFieldCollection mFieldCollection{};
};

} // namespace

// Entry points of a TensorRT plugin shared library.
extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder)
{
    gLoggerFinder = finder;
}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static TreeAttentionPluginCreator creator;
    static IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
